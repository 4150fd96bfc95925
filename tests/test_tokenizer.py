"""The hand-written BPE tokenizer against open_clip's (the original CLIP tokenizer, MIT licensed)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from clip_text import VOCAB_FILE, Tokenizer

LONG = " ".join(f"word{i} and the quick brown fox jumps over the lazy dog" for i in range(25))  # ~200 words
TEXTS = [
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF A CAT, 4K, HDR!!!",
    "Café déjà vu — naïve façade, Ångström, Straße",
    "Tom &amp; Jerry &lt;3 &amp;amp; friends",  # HTML entities, one doubly escaped
    "emoji 🐶🚀 and ❤️ hearts, 日本語のテキスト, русский текст",
    "   lots\tof \n\n whitespace   ",
    "punctuation: (x+y)/2 = 3.14159; 'quotes' \"double\" it's we're i'll don't",
    "don't stop believin' 1234567890 $100 #hashtag @user http://example.com/a?b=c",
    "",
    LONG,
]


@pytest.fixture(scope="module")
def reference():
    # Import open_clip's tokenizer module by file: the package __init__ needs torchvision, which this
    # project keeps out (see README).
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SimpleTokenizer(str(VOCAB_FILE))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_open_clip(reference, text):
    assert Tokenizer().encode(text) == reference.encode(text)


def test_sd_padding_and_truncation(reference):
    tok = Tokenizer()
    ids = tok(TEXTS)
    assert ids.shape == (len(TEXTS), 77) and ids.dtype == torch.long
    start, end = 49406, 49407
    for row, text in zip(ids.tolist(), TEXTS):
        ref = reference([text], context_length=77)[0].tolist()  # open_clip pads with 0, SD 1.x with the end token
        n = min(len(reference.encode(text)) + 2, 77)
        assert row[:n] == ref[:n] and row[0] == start and row[n - 1] == end
        assert row[n:] == [end] * (77 - n)
    assert len(reference.encode(LONG)) > 75 and ids[-1, -1] == end  # truncated, end token kept last


def test_decode_round_trip():
    tok = Tokenizer()
    assert tok.decode(tok.encode("a photo of a cat")).strip() == "a photo of a cat"


def test_concept_words_are_whole_and_change_no_existing_id():
    tok = Tokenizer()
    before = tok.encode("a photo of alice and bob <a> alicebob")
    assert tok.add_concept("<alice>", 2) == [49408, 49409] and tok.add_concept("<alice2>") == [49410]
    assert len(tok) == 49411
    assert tok.encode("a photo of <Alice> and <alice2>") == [*tok.encode("a photo of"), 49408, 49409, *tok.encode("and"), 49410]
    assert tok.encode("a photo of alice and bob <a> alicebob") == before
    assert tok.decode([49408, 49409, 49410]) == "<alice><alice>#1<alice2>"
    with pytest.raises(ValueError, match="already"):
        tok.add_concept("<alice>")
    with pytest.raises(ValueError, match="lower case"):
        tok.add_concept("<Bob>")
