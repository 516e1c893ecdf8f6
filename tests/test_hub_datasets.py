"""The hub-dataset route and the checks that come before any tokenization."""
from conftest import REPO, assert_one_line_error, run


def test_a_bad_stride_is_refused_before_any_tokenization(tmp_path, untrained_model, corpus_files):
    cache = tmp_path / "cache"
    result = run(["evaluate.py", "--model_name_or_path", untrained_model, "--test_file", corpus_files["validation"],
                  "--split", "test", "--block_size", "32", "--stride", "0"],
                 env={"LMCOMPRESS_CACHE": str(cache)}, check=False)
    assert_one_line_error(result, "--stride 0")
    assert not cache.exists() or not any(cache.iterdir()), "nothing was tokenized"


def test_a_model_folder_that_does_not_exist_says_so(tmp_path, corpus_files):
    missing = "outputs/truncated/gpt2-alt"
    result = run([REPO / "train.py", "--model_name_or_path", missing, "--train_file", corpus_files["train"],
                  "--output_dir", tmp_path / "out", "--report_to", "none"], cwd=tmp_path, check=False)
    line = assert_one_line_error(result, missing)
    assert "Repo id" not in line and "truncate.py" in line, line
