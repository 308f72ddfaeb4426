import pytest

from jobs.bench_data import main


@pytest.mark.parametrize("argv, message", [
    (["--vocab-sizes=abc"], "--vocab-sizes: 'abc' is not a number"),
    (["--threads=1,0"], "--threads: 0 must be at least 1"),
    (["--device=gpu"], "--device: invalid choice: 'gpu'"),
])
def test_bad_arguments_are_one_usage_error_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
