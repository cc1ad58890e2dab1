"""The baseline variant: the trained model as it is, which every other variant is measured
against."""

from __future__ import annotations

from torchship.components.compress.context import Context
from torchship.components.compress.registry import Made, Variant, register


def make(ctx: Context) -> Made:
    return Made(model=ctx.fp32)


VARIANT = register(Variant(
    name="fp32", order=0, kind="baseline", format="torch", make=make,
    description="the trained model as it is: the baseline every other variant is measured against",
))
