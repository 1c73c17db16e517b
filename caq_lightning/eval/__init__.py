"""Safety and quality evaluation: refusal scoring, DDP-syncing metrics, SafetyBench, and the one-call suite."""

from caq_lightning.eval.metrics import MeanKL, Perplexity, RefusalLogOdds, RefusalRate, perplexity_windows
from caq_lightning.eval.refusal import (
    REFUSAL_KEYWORDS,
    chat_prompts,
    generate_responses,
    is_refusal,
    refusal_logodds,
)
from caq_lightning.eval.safetybench import (
    SAFETYBENCH_CATEGORIES,
    SafetyBenchAccuracy,
    evaluate_safetybench,
    load_safetybench,
    option_logprobs,
    safetybench_items,
)
from caq_lightning.eval.suite import (
    evaluate_model,
    harmbench_prompts,
    read_prompts,
    wikitext2_test_text,
    xstest_prompts,
    xstest_safe_prompts,
)

__all__ = [
    "REFUSAL_KEYWORDS",
    "SAFETYBENCH_CATEGORIES",
    "MeanKL",
    "Perplexity",
    "RefusalLogOdds",
    "RefusalRate",
    "SafetyBenchAccuracy",
    "chat_prompts",
    "evaluate_model",
    "evaluate_safetybench",
    "generate_responses",
    "harmbench_prompts",
    "is_refusal",
    "load_safetybench",
    "option_logprobs",
    "perplexity_windows",
    "read_prompts",
    "safetybench_items",
    "refusal_logodds",
    "wikitext2_test_text",
    "xstest_prompts",
    "xstest_safe_prompts",
]
