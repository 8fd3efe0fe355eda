"""The planning layout of one segment (the MMPL paper, App. C.2): which latents each group makes
and which clean latents it may see, the anchors that seed the next segment, and how image-to-video
starts. Data in every profile (`layout:`), read and checked here."""

from __future__ import annotations

from dataclasses import dataclass

from mmpl_cli.terms import Kind, Seeding
from mmpl_cli.yamlio import Fields, Located

MAX_LATENTS = 256  # per segment; Wan's 81-frame window is 21


@dataclass(frozen=True)
class Group:
    """One group of a segment: the latents it denoises and the clean latents it may attend to."""

    targets: tuple[int, ...]
    sees: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """The index groups of one segment (MMPL paper, App. C.2); latent indices inside a segment."""

    latents: int  # latents per segment (21 for Wan's 81-frame window)
    initial: tuple[int, ...]  # the initial group, handed over from the previous segment
    plan: Group  # micro plan: early, midpoint and terminal planning latents, jointly
    populate_stage_one: Group
    populate_stage_two: Group
    terminal_anchor: tuple[int, ...]  # planning latents that seed the next segment (terminal seeding)
    midpoint_anchor: tuple[int, ...]  # ... (mid-point seeding)
    # image-to-video (App. K.1, as MMPL's released I2V code): the first segment's initial group is the
    # still image encoded alone (`image`), then the rest of the group generated seeing it
    image: tuple[int, ...]
    after_image: Group

    def groups(self) -> dict[str, Group]:
        """The groups denoised against context, by kind (the initial group is made from text or handed over)."""
        return {Kind.PLAN: self.plan, Kind.POPULATE_ONE: self.populate_stage_one, Kind.POPULATE_TWO: self.populate_stage_two}

    def group(self, kind: str) -> Group:
        """The latents a group makes and those it attends to; the initial group attends to nothing."""
        return Group(self.initial, ()) if kind == Kind.INITIAL else self.groups()[kind]

    def anchor(self, seeding: str) -> tuple[int, ...]:
        return self.terminal_anchor if seeding == Seeding.TERMINAL else self.midpoint_anchor

    def last_latent(self, seeding: str) -> int:
        """The last latent that is populated: mid-point seeding never fills what follows the midpoint."""
        return self.latents - 1 if seeding == Seeding.TERMINAL else max(self.midpoint_anchor)

    def decoded(self, seeding: str, after_previous: bool = False) -> int:
        """Latents one decode task runs through the VAE: the window's, or for a later segment decoded
        after the previous one (profile `decode: after-previous`, render.ShotRunner._decode) the
        previous window's first and then this one's after its initial group, which stands for the
        previous window's last frames."""
        window = self.last_latent(seeding) + 1
        return 2 * window - len(self.initial) if after_previous else window


def parse_layout(f: Fields, lay: Located) -> Layout:
    """`layout:` of a profile; every problem goes to `f`."""
    f.unknown_keys(lay, {"latents", "initial", "plan", "populate_stage_one", "populate_stage_two",
                         "terminal_anchor", "midpoint_anchor", "image_to_video"}, "layout")
    latents = f.get(lay, "latents", "layout", "int", required=True, default=21, minimum=3, maximum=MAX_LATENTS)
    initial = _indices(f, lay, "initial", "layout", latents)
    i2v = f.get(lay, "image_to_video", "layout", "mapping")
    if i2v is None:  # the image as the first latent, the rest of the initial group generated
        image, after_image = initial[:1], Group(initial[1:], initial[:1])
    else:
        f.unknown_keys(i2v, {"image", "then"}, "layout.image_to_video")
        image = _indices(f, i2v, "image", "layout.image_to_video", latents)
        then = f.get(i2v, "then", "layout.image_to_video", "mapping", required=True) or Located()
        f.unknown_keys(then, {"targets", "sees"}, "layout.image_to_video.then")
        after_image = Group(_indices(f, then, "targets", "layout.image_to_video.then", latents),
                            _indices(f, then, "sees", "layout.image_to_video.then", latents))
        if not image:
            f.add(f.line_of(i2v, "image"), "layout.image_to_video.image", "expected at least one latent index, found none")
        if sorted(image + after_image.targets) != list(initial) or not set(after_image.sees) <= set(image):
            f.add(f.line_of(lay, "image_to_video"), "layout.image_to_video",
                  "expected `image` and `then.targets` to split the initial group, and `then` to see only `image`")
    layout = Layout(
        latents=latents,
        initial=initial, image=image, after_image=after_image,
        plan=_group(f, lay, "plan", latents),
        populate_stage_one=_group(f, lay, "populate_stage_one", latents),
        populate_stage_two=_group(f, lay, "populate_stage_two", latents),
        terminal_anchor=_indices(f, lay, "terminal_anchor", "layout", latents),
        midpoint_anchor=_indices(f, lay, "midpoint_anchor", "layout", latents),
    )
    _check_layout(f, lay, layout)
    return layout


def _indices(f: Fields, mapping: Located, key: str, prefix: str, latents: int) -> tuple[int, ...]:
    values = f.get(mapping, key, prefix, "list", required=True, default=[])
    line = f.line_of(mapping, key)
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < latents:
            f.add(line, f"{prefix}.{key}", f"expected latent indices 0..{latents - 1}, found {v!r}")
            return ()
        out.append(v)
    if len(set(out)) != len(out):
        f.add(line, f"{prefix}.{key}", "expected distinct latent indices, found a repeated one")
    return tuple(sorted(out))


def _group(f: Fields, layout: Located, key: str, latents: int) -> Group:
    m = f.get(layout, key, "layout", "mapping", required=True)
    if m is None:
        return Group((), ())
    prefix = f"layout.{key}"
    f.unknown_keys(m, {"targets", "sees"}, prefix)
    return Group(_indices(f, m, "targets", prefix, latents), _indices(f, m, "sees", prefix, latents))


def _check_layout(f: Fields, lay: Located, layout: Layout) -> None:
    """The groups must tile the segment and only look at latents that exist when they run."""
    line = lay.line
    groups = [layout.initial, layout.plan.targets, layout.populate_stage_one.targets,
              layout.populate_stage_two.targets]
    flat = [i for g in groups for i in g]
    for key, indices in (("initial", layout.initial), ("plan.targets", layout.plan.targets),
                         ("populate_stage_one.targets", layout.populate_stage_one.targets),
                         ("populate_stage_two.targets", layout.populate_stage_two.targets),
                         ("terminal_anchor", layout.terminal_anchor), ("midpoint_anchor", layout.midpoint_anchor)):
        if not indices:
            f.add(line, f"layout.{key}", "expected at least one latent index, found none")
    if sorted(flat) != list(range(layout.latents)):
        f.add(line, "layout", f"expected the groups to cover latents 0..{layout.latents - 1} exactly once")
    available = set(layout.initial)
    for key, stage in layout.groups().items():
        early = set(stage.sees) - available
        if early:
            f.add(line, f"layout.{key}.sees", f"latents {sorted(early)} are not generated before this stage")
        available |= set(stage.targets)
    if not set(layout.terminal_anchor) <= set(layout.plan.targets):
        f.add(line, "layout.terminal_anchor", "expected planning latents")
    if not set(layout.midpoint_anchor) <= set(layout.plan.targets):
        f.add(line, "layout.midpoint_anchor", "expected planning latents")
    if layout.terminal_anchor and max(layout.terminal_anchor) != layout.latents - 1:
        f.add(line, "layout.terminal_anchor", "expected to end at the last latent of the segment")
