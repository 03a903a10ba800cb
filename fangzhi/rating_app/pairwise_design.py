"""Which comparisons a rater of a side-by-side (pairwise) study sees, on which sides, in which order.

For every (prompt, seed) the rater compares pairs of its arms' images: all pairs for up to
FULL_DESIGN_MAX_ARMS arms; with more, a cycle through the arms in a random order of its own (each arm
in exactly two comparisons of the unit, and over many units every pair comes up). Sides are chosen
so that each arm is on the left as often as on the right for each rater, give or take one
(`balanced_sides`). QC: a few comparisons come again later with the sides swapped ('retest'), and a
few attention items put one image beside a blank one the app draws itself (the right answer is the
image). `study.order_apart` orders them: random, with no two comparisons of one (prompt, seed) back to back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from fangzhi.errors import FangzhiError

FULL_DESIGN_MAX_ARMS = 4


@dataclass(frozen=True)
class PlannedComparison:
    prompt_id: str
    seed: int
    left: str | None  # image_id; None is the blank image (attention items only)
    right: str | None
    kind: str  # 'main', 'retest' or 'attention'

    @property
    def pair_key(self) -> tuple[str, int]:
        return (self.prompt_id, self.seed)

    @property
    def identity(self) -> tuple[str, int, frozenset]:
        """The same for a comparison and its swapped-side repeat."""
        return (self.prompt_id, self.seed, frozenset((self.left, self.right)))


def unit_pairs(arms: list[str], rng: np.random.Generator) -> list[tuple[str, str]]:
    """The arm pairs compared on one (prompt, seed); every arm is in the same number of them."""
    if len(arms) <= FULL_DESIGN_MAX_ARMS:
        return list(combinations(arms, 2))
    cycle = [arms[i] for i in rng.permutation(len(arms))]
    return [(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]


def balanced_sides(edges: list[tuple[int, int]], n_vertices: int, rng: np.random.Generator) -> list[bool]:
    """For each comparison (a, b) of arm numbers: True when a goes on the left.

    Each arm ends up on the left as often as on the right, or one more or less: join every arm with an
    odd number of comparisons to an extra vertex, walk the (now Eulerian) graph edge by edge (Hierholzer)
    and put each comparison's arm the walk leaves from on the left. A closed walk leaves every vertex as
    often as it enters it; removing the extra edges moves each arm off balance by at most one.
    """
    degree = np.bincount(np.asarray(edges, dtype=np.int64).ravel(), minlength=n_vertices) if edges else np.zeros(n_vertices, int)
    extra = n_vertices
    walk_edges = list(edges) + [(int(v), extra) for v in np.flatnonzero(degree % 2)]
    incident: list[list[int]] = [[] for _ in range(n_vertices + 1)]
    for index, (a, b) in enumerate(walk_edges):
        incident[a].append(index)
        incident[b].append(index)
    for edge_list in incident:
        rng.shuffle(edge_list)
    used = np.zeros(len(walk_edges), dtype=bool)
    first_on_left = np.zeros(len(walk_edges), dtype=bool)
    for start in rng.permutation(n_vertices + 1):
        stack = [int(start)]
        while stack:
            vertex = stack[-1]
            while incident[vertex] and used[incident[vertex][-1]]:
                incident[vertex].pop()
            if not incident[vertex]:
                stack.pop()
                continue
            edge = incident[vertex].pop()
            used[edge] = True
            a, b = walk_edges[edge]
            first_on_left[edge] = a == vertex
            stack.append(b if a == vertex else a)
    return [bool(x) for x in first_on_left[: len(edges)]]


def plan_comparisons(
    units: Mapping[tuple[str, int], Mapping[str, str]], qc_retest: int, qc_attention: int, rng: np.random.Generator
) -> list[PlannedComparison]:
    """One rater's comparisons, not yet ordered (`study.order_apart` orders them); `units` maps (prompt, seed) to {arm: image_id}."""
    arms = sorted({arm for by_arm in units.values() for arm in by_arm})
    if len(arms) < 2:
        raise FangzhiError(f"a pairwise study needs at least two arms; the manifest has {', '.join(arms) or 'none'}")
    pairs = [(key, a, b) for key in units for a, b in unit_pairs(arms, rng)]
    number = {arm: i for i, arm in enumerate(arms)}
    sides = balanced_sides([(number[a], number[b]) for _, a, b in pairs], len(arms), rng)
    main = [
        PlannedComparison(key[0], key[1], units[key][a if a_left else b], units[key][b if a_left else a], "main")
        for (key, a, b), a_left in zip(pairs, sides)
    ]
    if qc_retest > len(main):
        raise FangzhiError(f"qc_retest={qc_retest} is more than the {len(main)} comparisons of a rater")
    retests = [
        PlannedComparison(c.prompt_id, c.seed, c.right, c.left, "retest") for c in (main[i] for i in rng.choice(len(main), size=qc_retest, replace=False))
    ]
    images = [(key, image_id) for key, by_arm in units.items() for image_id in by_arm.values()]
    blank_left_first = bool(rng.integers(2))
    attention = []
    for j in range(qc_attention):
        (prompt_id, seed), image_id = images[rng.integers(len(images))]
        blank_left = (j % 2 == 0) == blank_left_first  # the blank alternates sides
        attention.append(PlannedComparison(prompt_id, seed, None if blank_left else image_id, image_id if blank_left else None, "attention"))
    return main + retests + attention
