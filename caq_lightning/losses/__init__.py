"""CAQ losses (see :mod:`caq_lightning.losses.functional`)."""

from caq_lightning.losses.functional import *  # noqa: F403
from caq_lightning.losses.functional import _check_cached, _check_k, _check_logits, _check_same_vocab, _token_kl  # noqa: F401
