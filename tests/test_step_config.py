"""carclf.cli.step_config: the one CLI skeleton of the steps (parse -> step -> print, one-line errors)."""

import dataclasses

import pytest

from carclf.cli.step_config import build_parser, param, run_step


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    name: str = param(help="required text")
    size: int = param(8, "an integer")
    ratio: float = param(0.5, "a number")
    flag: bool = param(False, "a boolean")
    port: int | None = param(None, "optional integer")
    mode: str = param("a", "a choice", choices=("a", "b"))


def test_parser_reads_mlflow_strings():
    args = build_parser(ToyConfig, "toy").parse_args(
        ["--name", "x", "--size", "16.0", "--ratio", "2", "--flag", "true", "--port", ""]
    )
    assert (args.size, args.ratio, args.flag, args.port, args.mode) == (16, 2.0, True, None, "a")
    assert build_parser(ToyConfig, "toy").parse_args(["--name", "x", "--port", "9"]).port == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "8"], "error: the following arguments are required: --name"),
        (["--name", "x", "--size", "8.5"], "error: argument --size: expected an integer, got '8.5'"),
        (["--name", "x", "--mode", "c"], "error: argument --mode: invalid choice"),
    ],
)
def test_argparse_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_step(lambda c: c, ToyConfig, "toy", "", argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_expected_errors_are_one_line_and_others_keep_their_traceback(capsys):
    def step(config):
        if config.name == "bad":
            raise ValueError(f"size {config.size} is wrong")
        raise KeyError("a bug")

    assert run_step(step, ToyConfig, "toy", "", ["--name", "bad", "--size", "3"], expected_errors=(ValueError,)) == 2
    assert capsys.readouterr().err == "error: size 3 is wrong\n"
    with pytest.raises(KeyError):
        run_step(step, ToyConfig, "toy", "", ["--name", "other"], expected_errors=(ValueError,))


def test_result_is_printed(capsys):
    assert run_step(lambda c: c.size * 2, ToyConfig, "toy", "", ["--name", "x", "--size", "21"]) == 0
    assert capsys.readouterr().out == "42\n"


class WorkerGone(RuntimeError):
    pass


def test_exit_codes_per_error_and_a_one_line_interrupt(capsys):
    def step(config):
        if config.name == "worker":
            raise WorkerGone("worker 1 exited with code 9")
        raise KeyboardInterrupt

    codes = {"expected_errors": (WorkerGone,), "exit_codes": {WorkerGone: 1}}
    assert run_step(step, ToyConfig, "toy", "", ["--name", "worker"], **codes) == 1
    assert capsys.readouterr().err == "error: worker 1 exited with code 9\n"
    assert (
        run_step(step, ToyConfig, "toy", "", ["--name", "ctrl-c"], interrupted_line="run ended KILLED", **codes) == 130
    )
    assert capsys.readouterr().err == "interrupted: run ended KILLED\n"
    with pytest.raises(KeyboardInterrupt):
        run_step(step, ToyConfig, "toy", "", ["--name", "ctrl-c"], **codes)


def test_train_cli_names_a_missing_data_file_in_one_line(tmp_path, capsys):
    from entry_points.train import main

    missing = tmp_path / "nope.h5"
    assert main(["--train-data", str(missing), "--val-data", str(missing), "--registered-model-name", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.h5" in err[0], err
