"""What the runtime and every export format need besides the folded weights: the bits and transforms of a run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from caq_lightning.quant.quantizer import QuantSpec


@dataclass
class QuantRecipe:
    """Everything besides the folded weights that the runtime and the int4 export need."""

    w_spec: QuantSpec
    a_spec: QuantSpec
    kv_spec: QuantSpec
    online_hadamard: bool  # R4 (and R3 unless online_r3 says otherwise)
    rounding: str = "rtn"  # or "gptq"
    online_r3: bool | None = None  # None: as online_hadamard
    profile: str = "full"  # "serve": R4 is quant.hadamard.sylvester_blocks (see QuantConfig.profile)
    # name of each decoder Linear -> (codes (out, G, g), scale (out, G, 1), zero (out, G, 1))
    weights: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description for ``config.json``'s ``quantization_config``."""
        return {
            "quant_method": "caq",
            "weights": asdict(self.w_spec),
            "activations": {**asdict(self.a_spec), "granularity": "per-token", "dynamic": True},
            "kv_cache": {**asdict(self.kv_spec), "granularity": "per-token-per-head"},
            "online_hadamard": {"q_k_after_rope_R3": self.hadamard_qk, "down_proj_input_R4": self.online_hadamard},
            "rounding": self.rounding,
            "profile": self.profile,
        }

    @property
    def hadamard_qk(self) -> bool:
        """Whether R3 (the online Hadamard on q and k after RoPE) is on."""
        return self.online_hadamard if self.online_r3 is None else self.online_r3

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> QuantRecipe:
        def spec(d: dict) -> QuantSpec:
            return QuantSpec(d["bits"], d["symmetric"], d["group_size"], d["clip_ratio"], d.get("scale_rule", "qmax"))

        hadamard = config["online_hadamard"]
        return cls(
            w_spec=spec(config["weights"]), a_spec=spec(config["activations"]), kv_spec=spec(config["kv_cache"]),
            online_hadamard=hadamard["down_proj_input_R4"], rounding=config.get("rounding", "rtn"),
            online_r3=hadamard["q_k_after_rope_R3"], profile=config.get("profile", "full"),
        )  # fmt: skip
