import json

import pytest
from PIL import Image

from slimserve.cli import main
from tests.diffusion.test_distill import tiny_teacher
from tests.diffusion.tiny_pipelines import sd_with_text


def test_distill_steps_then_diffuse_with_every_acceleration(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path / "teacher")
    main(["distill-steps", str(teacher), "--out", str(tmp_path / "student"), "--student-steps", "2", "--substeps",
          "2", "--num-trajectories", "4", "--train-steps", "2", "--batch-size", "4"])  # fmt: skip
    assert (tmp_path / "student" / "model_index.json").exists()
    out = tmp_path / "images.png"
    main(["diffuse", str(tmp_path / "student"), "--class-label", "1", "--class-label", "3", "--out", str(out),
          "--solver", "euler", "--cache", "fixed", "--quantization", "int8", "--device", "cpu"])  # fmt: skip
    assert Image.open(out).size == (16, 8)
    assert "2 steps" in capsys.readouterr().out  # the distilled step count is the default


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["diffuse", str(tmp_path), "--class-label", "1", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1
    assert "model_index.json missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["distill-steps", str(tmp_path), "--out", str(tmp_path / "s"), "--student-steps", "0"])
    assert exit_info.value.code == 1


def test_distill_steps_of_a_text_pipeline_from_a_captions_file_then_diffuse(tmp_path, capsys):
    sd_with_text().save_pretrained(tmp_path / "teacher")
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a cat\n\na red house\n")
    main(["distill-steps", str(tmp_path / "teacher"), "--out", str(tmp_path / "student"), "--captions-file",
          str(captions), "--caption", "a blue tree", "--student-steps", "2", "--substeps", "2", "--num-trajectories",
          "4", "--train-steps", "2", "--batch-size", "4", "--height", "16", "--width", "16"])  # fmt: skip
    recipe = json.loads((tmp_path / "student" / "distillation.json").read_text())
    assert recipe["captions"] == ["a blue tree", "a photo of a cat", "a red house"]
    out = tmp_path / "images.png"
    main(["diffuse", str(tmp_path / "student"), "--prompt", "a cat", "--out", str(out), "--device", "cpu"])
    assert Image.open(out).size == (16, 16)  # the distilled size and step count are the defaults
    assert "2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["distill-steps", str(tmp_path / "teacher"), "--out", str(tmp_path / "s"), "--captions-file", "nope.txt"])
    assert exit_info.value.code == 1
    assert "captions file not found" in capsys.readouterr().err
