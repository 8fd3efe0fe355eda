"""The procedural video source the tiny default is trained on, and how renders are judged from it."""

from __future__ import annotations

from functools import partial

import pytest
import numpy as np

from mmpl_cli import procedural as P


def test_scenes_are_deterministic_and_captions_round_trip():
    a, b = P.scene_from_seed(5), P.scene_from_seed(5)
    assert a == b and np.array_equal(P.render_scene(a, 9, 96, 64), P.render_scene(b, 9, 96, 64))
    seen = set()
    for seed in range(60):
        scene = P.scene_from_seed(seed)
        assert scene.colour != scene.background
        back = P.scene_from_caption(scene.caption())
        assert (back.shape, back.colour, back.background, back.direction, back.size) == \
               (scene.shape, scene.colour, scene.background, scene.direction, scene.size)
        seen.add((scene.shape, scene.background, scene.direction))
    assert len(seen) > 30  # the source varies


def test_colours_are_named_back_by_hue():
    for name, rgb in P.COLOURS.items():
        assert P.name_colour(rgb) == name
    for seed in range(30):
        scene = P.scene_from_seed(seed)
        frames = P.render_scene(scene, 33, 96, 64)
        assert P.background_colour(frames[0]) == scene.background
        assert P.background_colour(frames[-1]) == scene.background


@pytest.mark.slow
def test_shapes_move_the_way_the_caption_says():
    for seed in range(20):
        scene = P.scene_from_seed(seed)
        dx, dy = P.shape_motion(P.render_scene(scene, 17, 96, 64), scene.colour)
        ex, ey = P.DIRECTIONS[scene.direction]
        assert dx * ex + dy * ey > 10, (scene, dx, dy)  # at least 10 px along the caption's direction
        assert abs(dx * ey) + abs(dy * ex) < 2  # and not across it


def test_shapes_bounce_off_the_walls():
    scene = P.Scene("circle", "red", "blue", "right", "small", (0.7, 0.5))
    xs = [P.position(scene, f, 96, 64)[0] for f in range(200)]
    radius = P.SIZES["small"] * 64 / 2
    assert min(xs) >= radius - 1e-9 and max(xs) <= 96 - radius + 1e-9
    assert any(b < a for a, b in zip(xs, xs[1:]))  # it came back


def test_word_tokenizer_covers_every_caption_word():
    from mmpl_cli.tiny import word_tokenizer

    tok = word_tokenizer(P.vocabulary())
    ids = tok("A small Red circle moving right on a blue background")["input_ids"]
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id and len(ids) == 11
    assert tok("a purple circle")["input_ids"][1] == tok.unk_token_id


def test_unknown_words_are_those_the_tokenizer_reads_as_unk():
    from mmpl_cli.tiny import byte_tokenizer, word_tokenizer
    from mmpl_cli.vocabulary import unknown_words

    tok = word_tokenizer(P.vocabulary())
    words = partial(unknown_words, tok.backend_tokenizer, tok.unk_token_id)
    assert words("A purple circle Spinning right on a purple background") == ["purple", "Spinning"]
    assert words("a small red circle moving right on a blue background") == []
    byte = byte_tokenizer()  # bytes: nothing is unknown
    assert unknown_words(byte.backend_tokenizer, byte.unk_token_id, "a purple circle spinning \u2713") == []


def test_unknown_prompt_words_reads_the_model_folders_tokenizer(tiny_model_dir, tmp_path):
    from mmpl_cli.profiles import load_profile
    from mmpl_cli.vocabulary import unknown_prompt_words

    prompts = {"a": ["a red circle", "a Zorblax circle"], "b": ["a red circle"]}
    assert unknown_prompt_words(load_profile("tiny").resolve_model_path(), prompts) == {"a": ["Zorblax"]}  # word-level
    assert unknown_prompt_words(tiny_model_dir, prompts) == {}  # byte-level: every word reads
    assert unknown_prompt_words(tmp_path, prompts) == {}  # no tokenizer there: no check


@pytest.mark.slow
def test_judge_agrees_with_the_true_video_and_not_with_a_wrong_one():
    from mmpl_cli.procedural import judge, prompt_scenes, render_scene

    scenes = prompt_scenes(12)
    for scene in scenes:
        result = judge(render_scene(scene, 17, 96, 64), scene)
        assert result["first_ok"] and result["last_ok"] and result["direction_ok"], result
        backwards = {"left": "right", "right": "left", "up": "down", "down": "up"}[scene.direction]
        reversed_video = render_scene(scene, 17, 96, 64)[::-1]  # the same shape, moving the other way
        assert not judge(reversed_video, scene)["direction_ok"], (scene, backwards)
