"""A user's mistake on the command line is answered with ONE line naming what is wrong and exit status 2,
no traceback (xsam.logs.cli_errors); with --verbose the traceback comes too. In process (main([...])):
the predict CLI's missing / empty checkpoint folder, truncated weights, a panoptic task without
categories, prompt masks of the wrong shape; the train CLI's unknown stage setting."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "model"))
from model_fixtures import tiny_model, tiny_tokenizer

from xsam.model.checkpoint import save_stage_checkpoint
from xsam.model.predict import main as predict_main
from xsam.model.stages import S3


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A complete (untrained) tiny S3 export with its tokenizer, and a 48x64 image."""
    tmp = tmp_path_factory.mktemp("predict")
    tok = tiny_tokenizer(tmp / "tok")
    cfg, model = tiny_model(tok, "s3", seed=0)
    save_stage_checkpoint(model, S3, cfg, tmp / "ckpt", tokenizer=tok)
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp / "in.png")
    return tmp


def _answer(capsys, main, argv) -> str:
    """Run main(argv) expecting a user error -> its one stderr line (exit 2, no traceback checked)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _predict(tmp, *extra, checkpoint=None, task="referring"):
    return ["--checkpoint", str(checkpoint or tmp / "ckpt"), "--image", str(tmp / "in.png"), "--task", task,
            "--out", str(tmp / "o.png"), "--device", "cpu", "--dtype", "fp32", *extra]


def test_predict_missing_checkpoint_folder(export, capsys):
    line = _answer(capsys, predict_main, _predict(export, "--prompt", "a box", checkpoint=export / "nowhere"))
    assert line.startswith("[predict] error: ") and str(export / "nowhere") in line and "manifest.json" in line


def test_predict_empty_checkpoint_folder(export, capsys):
    (export / "empty").mkdir(exist_ok=True)
    line = _answer(capsys, predict_main, _predict(export, "--prompt", "a box", checkpoint=export / "empty"))
    assert str(export / "empty") in line and "manifest.json" in line


def test_predict_truncated_weights(export, capsys, tmp_path):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(export / "ckpt", broken)
    (shard,) = broken.glob("model-*.safetensors")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = _answer(capsys, predict_main, _predict(export, "--prompt", "a box", checkpoint=broken))
    assert shard.name in line and f"has {len(data) // 2} bytes, manifest.json says {len(data)}" in line, line


def test_predict_panoptic_without_categories(export, capsys):
    line = _answer(capsys, predict_main, _predict(export, task="panoptic"))
    assert "categories" in line and "--prompt" in line, line


def test_predict_prompt_masks_of_the_wrong_shape(export, capsys, tmp_path):
    np.save(tmp_path / "pm.npy", np.ones((1, 32, 32), bool))
    line = _answer(capsys, predict_main, _predict(export, "--prompt-masks", str(tmp_path / "pm.npy"), task="interactive"))
    assert "[1, 32, 32]" in line and "[R, 48, 64]" in line, line
    np.save(tmp_path / "flat.npy", np.ones((48, 64), bool))
    line = _answer(capsys, predict_main, _predict(export, "--prompt-masks", str(tmp_path / "flat.npy"), task="vgd"))
    assert "[48, 64]" in line, line
    line = _answer(capsys, predict_main, _predict(export, "--prompt-masks", str(tmp_path / "no.npy"), task="vgd"))
    assert "no.npy" in line and "no such file" in line, line


def test_predict_missing_image(export, capsys):
    argv = _predict(export, "--prompt", "a box")
    argv[argv.index("--image") + 1] = str(export / "nope.png")
    line = _answer(capsys, predict_main, argv)
    assert "--image" in line and "nope.png" in line


def test_verbose_keeps_the_traceback(export, capsys):
    with pytest.raises(SystemExit) as exit_:
        predict_main(_predict(export, "--verbose", task="panoptic"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("[predict] error:")


def test_a_good_request_still_predicts(export, capsys):
    """The checks refuse only mistakes: the same export and image with a prompt predict (exit normally)."""
    import json

    predict_main(_predict(export, "--prompt", "a box"))
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task"] == "referring" and out["labels"] == ["a box"]


def test_workflow_and_evaluate_mistakes_are_one_line(capsys, tmp_path):
    """xsam-run with an unknown profile; xsam-evaluate on a benchmark that was never converted; xsam-convert
    on a registry folder that does not exist."""
    from xsam.pipelines.convert import main as convert_main
    from xsam.pipelines.evaluate import main as evaluate_main
    from xsam.pipelines.full_run import main as full_run_main

    assert full_run_main(["--profile", "no-such-profile", "--dry-run"]) == 2  # settings: a line per problem
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--profile: no profile 'no-such-profile'" in err, err
    line = _answer(capsys, evaluate_main, ["--checkpoints", str(tmp_path / "ckpt"), "--shards", str(tmp_path),
                                           "--benchmarks", "nothing/val",
                                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert line.startswith("[evaluate] error: ") and "nothing/val" in line and "convert it first" in line
    with pytest.raises(SystemExit) as exit_:
        convert_main(["--registry", str(tmp_path / "no-registry"), "--validate-only"])
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and "Traceback" not in err and str(tmp_path / "no-registry") in err, err
