"""The token diff names the seed's two causes of 39 tokens, and other differences, in plain words."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_tinyllama.chat_template import SEED_PROMPT
from mlx_tinyllama.tokendiff import align, compare_ids
from mlx_tinyllama.tokenizer import Tokenizer
from conftest import PACKAGED, SEED_IDS

TOK = Tokenizer.from_file(PACKAGED)


def test_identical():
    a = compare_ids(SEED_IDS, SEED_IDS, TOK)
    assert a.identical and a.distance == 0 and a.summary() == "identical: 38 ids"


def test_extra_bos_is_named():
    a = compare_ids(SEED_IDS, [1] + SEED_IDS, TOK)
    assert [d.message for d in a.differences] == ["extra BOS (id 1) at position 0"]
    assert a.differences[0].kind == "extra_bos"
    assert compare_ids([1] + SEED_IDS, SEED_IDS, TOK).differences[0].message == "missing BOS (id 1) at position 0"


def test_eos_encoded_as_text_is_named():
    other = TOK._sp.encode(SEED_PROMPT)  # the whole prompt through SentencePiece: 39 ids
    assert len(other) == 39
    a = compare_ids(SEED_IDS, other, TOK)
    assert [d.kind for d in a.differences] == ["special_as_text", "special_as_text"]
    assert a.differences[1].message == ("`</s>` was encoded as text (`</`, `s`, `>`) instead of the special "
                                        "token 2 at positions 28-30")
    assert "(`.</`, `s`, `>`)" in a.differences[0].message


def test_both_causes_together_and_without_a_tokenizer():
    a = compare_ids(SEED_IDS, [1] + TOK._sp.encode(SEED_PROMPT))
    assert [d.kind for d in a.differences] == ["extra_bos", "special_as_text", "special_as_text"]


def test_text_read_as_special_token():
    # the reverse: the reference spelled `</s>` out as text, the other engine used id 2
    d = compare_ids(TOK._sp.encode("a</s>"), TOK.encode("a</s>"), TOK).differences[0]
    assert d.kind == "text_as_special" and "`</s>` was read as the special token 2" in d.message


def test_missing_prefix_space_after_special():
    other = [i for k, i in enumerate(SEED_IDS) if not (i == 29871 and SEED_IDS[k - 1] == 2)]
    a = compare_ids(SEED_IDS, other, TOK)
    assert [d.kind for d in a.differences] == ["missing_prefix_space"] * 2
    assert "`▁` (id 29871) after `</s>` at position 14" in a.differences[0].message


def test_generic_differences_show_pieces():
    inserted = compare_ids(SEED_IDS, SEED_IDS[:5] + [3492] + SEED_IDS[5:], TOK).differences[0]
    assert inserted.kind == "insert" and inserted.message == "extra token at position 5: 3492 `You`"
    deleted = compare_ids(SEED_IDS, SEED_IDS[:10] + SEED_IDS[12:], TOK).differences[0]
    assert deleted.kind == "delete" and "13563 `▁chat`, 7451 `bot`" in deleted.message
    replaced = compare_ids(SEED_IDS, SEED_IDS[:3] + [1792] + SEED_IDS[4:], TOK).differences[0]
    assert replaced.message == "at position 3: 1792 `user` instead of 29989 `|`"


def test_to_dict_is_json_ready():
    import json

    d = compare_ids(SEED_IDS, [1] + SEED_IDS, TOK).to_dict()
    assert json.loads(json.dumps(d))["differences"][0]["actual"] == {"start": 0, "stop": 1, "ids": [1]}


def _levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j - 1] + (x != y), prev[j] + 1, cur[j - 1] + 1))
        prev = cur
    return prev[-1]


@settings(max_examples=150, deadline=None)
@given(a=st.lists(st.integers(0, 6), max_size=14), b=st.lists(st.integers(0, 6), max_size=14))
def test_alignment_is_minimal_and_covers_both_sequences(a, b):
    ops = align(a, b)
    assert [i for _, i, _ in ops if i is not None] == list(range(len(a)))
    assert [j for _, _, j in ops if j is not None] == list(range(len(b)))
    assert all((a[i] == b[j]) == (t == "equal") for t, i, j in ops if i is not None and j is not None)
    assert sum(t != "equal" for t, _, _ in ops) == _levenshtein(a, b)
    assert compare_ids(a, b, TOK).identical == (a == b)
