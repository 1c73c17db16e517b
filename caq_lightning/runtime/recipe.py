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
    online_hadamard: bool
    rounding: str = "rtn"  # or "gptq"
    # name of each decoder Linear -> (codes (out, G, g), scale (out, G, 1), zero (out, G, 1))
    weights: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description for ``config.json``'s ``quantization_config``."""
        return {
            "quant_method": "caq",
            "weights": asdict(self.w_spec),
            "activations": {**asdict(self.a_spec), "granularity": "per-token", "dynamic": True},
            "kv_cache": {**asdict(self.kv_spec), "granularity": "per-token-per-head"},
            "online_hadamard": {"q_k_after_rope_R3": self.online_hadamard, "down_proj_input_R4": self.online_hadamard},
            "rounding": self.rounding,
        }

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> QuantRecipe:
        def spec(d: dict) -> QuantSpec:
            return QuantSpec(d["bits"], d["symmetric"], d["group_size"], d["clip_ratio"])

        return cls(
            w_spec=spec(config["weights"]), a_spec=spec(config["activations"]), kv_spec=spec(config["kv_cache"]),
            online_hadamard=config["online_hadamard"]["down_proj_input_R4"], rounding=config.get("rounding", "rtn"),
        )  # fmt: skip
