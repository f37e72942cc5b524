"""Unlearning methods (losses only). Importing this package registers every method.

To add one: a file here defining a config dataclass and a class decorated with
``@register_method("name")``, plus ``conf/method/<name>.yaml``; then import it below.
"""

from pipeline.methods import asu, asu_idk, asu_repr, grad_ascent, grad_diff, idk_dpo, npo, rmu, simnpo  # noqa: E402,F401  (registration)
from pipeline.methods.base import METHODS, LossOutput, UnlearningMethod, register_method  # noqa: F401


def build_method(mcfg, kl_impl: str = "naive", joint_pass: bool = True) -> UnlearningMethod:
    """Instantiate the method named by ``mcfg.name`` with its config node (``joint_pass=False``:
    one pass per row group, ``trainer.passes=per_group``)."""
    return METHODS.get(mcfg.name)(mcfg, kl_impl=kl_impl, joint_pass=joint_pass)
