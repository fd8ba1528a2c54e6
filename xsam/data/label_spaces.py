"""A label space name is bound to ONE category list.

Registry entries share a `label_space` name when their category ids mean the same thing; the
training formatter and the benchmarks look a space's categories up by that name. Two datasets
that name the same space with different categories would silently relabel one another's classes,
so every place that gathers label spaces (conversion, `convert --validate-only` over an output
tree, the training index) binds them through `LabelSpaces.bind`, which refuses a clash and names
both datasets and the first category that differs.

Categories are compared on what gives a class its meaning: `id`, `name` and, where present,
`isthing`; presentation fields (colour, supercategory) may differ.
"""

from __future__ import annotations

MEANING = ("id", "name", "isthing")


class LabelSpaceClash(ValueError):
    """Two datasets bind one label space name to different category lists."""


def _meaning(category: dict) -> tuple:
    return tuple(category.get(k) for k in MEANING)


def first_difference(a: list[dict], b: list[dict]) -> str | None:
    """A description of the first category where `a` and `b` differ in meaning, None when they agree."""
    for i, (ca, cb) in enumerate(zip(a, b)):
        if _meaning(ca) != _meaning(cb):
            show = lambda c: ", ".join(f"{k}={c.get(k)!r}" for k in MEANING if k in c)  # noqa: E731
            return f"category #{i}: {{{show(ca)}}} vs {{{show(cb)}}}"
    if len(a) != len(b):
        longer, n = (a, len(b)) if len(a) > len(b) else (b, len(a))
        return f"{len(a)} vs {len(b)} categories, first extra: {longer[n].get('name')!r} (id {longer[n].get('id')})"
    return None


class LabelSpaces:
    """Label space name -> (the dataset that bound it, its categories)."""

    def __init__(self) -> None:
        self.bound: dict[str, tuple[str, list[dict]]] = {}

    def bind(self, space: str | None, categories: list[dict] | None, dataset: str) -> None:
        """Bind `space` to `categories` (of `dataset`); LabelSpaceClash when it is bound to others."""
        if not space or categories is None:
            return
        if space not in self.bound:
            self.bound[space] = (dataset, categories)
            return
        first, known = self.bound[space]
        diff = first_difference(known, categories)
        if diff is not None:
            raise LabelSpaceClash(f"label space {space!r} of {dataset} differs from the one of {first}: {diff}; "
                                  "give one of them another label_space name in its registry entry")

    def categories(self) -> dict[str, list[dict]]:
        return {space: cats for space, (_, cats) in self.bound.items()}
