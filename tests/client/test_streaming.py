from transformers import AutoTokenizer

from dsdnode.client.streaming import TextStream


def test_streams_whole_characters_only(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "naïve café ☕ done"
    ids = tok(text)["input_ids"]
    pieces = []
    stream = TextStream(tok, pieces.append)
    for i in ids:
        stream.push([i])
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
