"""model.vocab_size from the tokenizer (issue #29 item 6): null takes the tokenizer's vocabulary padded to a
multiple of make_vocab_size_divisible_by x TP, resolved when the config is loaded, saved as a number; an explicit
value below the tokenizer's vocabulary is refused."""
import pytest
import sentencepiece as spm

from conftest import REPO
from rf_megatron.config import ConfigError
from rf_megatron.run_config import load_run_config, save_yaml

PIECES = 280


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real SentencePiece model of 280 pieces (trained on the README in well under a second)."""
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    spm.SentencePieceTrainer.train(input=str(REPO / "README.md"), model_prefix=str(prefix), vocab_size=PIECES,
                                   model_type="bpe", eos_id=1, bos_id=-1, unk_id=2, pad_id=0, minloglevel=2)
    return f"{prefix}.model"


@pytest.mark.parametrize("options,padded", [
    ([], 512),  # tiny_cpu: TP2 -> a multiple of 128 x 2
    (["parallel.tensor_parallel=1"], 384),
    (["parallel.tensor_parallel=1", "model.make_vocab_size_divisible_by=8"], 280),
])
def test_a_null_vocab_size_is_the_tokenizers_padded_for_tp(tokenizer, options, padded):
    cfg = load_run_config("tiny_cpu", [f"data.tokenizer_model={tokenizer}", *options])
    assert cfg.model.vocab_size == padded


def test_the_saved_config_holds_the_number(tokenizer, tmp_path):
    """What resume, export and the scaling tools read back: a number, even with the tokenizer gone."""
    cfg = load_run_config("tiny_cpu", [f"data.tokenizer_model={tokenizer}"])
    save_yaml(cfg, tmp_path / "config.yaml")
    again = load_run_config(str(tmp_path / "config.yaml"), ["data.tokenizer_model=gone.model"])
    assert again.model.vocab_size == 512


def test_an_explicit_vocab_size_below_the_tokenizers_is_refused(tokenizer):
    cfg = load_run_config("tiny_cpu", [f"data.tokenizer_model={tokenizer}", "model.vocab_size=256", "data.paths=[x]"])
    with pytest.raises(ConfigError, match=rf"^model.vocab_size=256 is smaller than the tokenizer's vocabulary "
                                          rf"\({PIECES}, .*tok.model\)"):
        cfg.validate(2)

