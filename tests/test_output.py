"""OutputProcessor on SmolLM2's real byte-level BPE tokenizer: incremental text, stop strings."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from qworker.engine.output import OutputProcessor
from qworker.sampling_params import SamplingParams

MULTILINGUAL = [
    "Hello 😀 wörld", " 中文字符 and 日本語", " flags 🇯🇵🇫🇷", " family 👨‍👩‍👧 ok",
    " naïve café — “quotes”", " Ωμέγα κόσμε", " emoji🤖🚀x", " 한국어 텍스트", "\n\tcode();",
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def ids_of(tok, *pieces: str) -> list[int]:
    """Token ids whose boundaries fall (at least) between ``pieces``."""
    return [i for p in pieces for i in tok.encode(p, add_special_tokens=False)]


def run(tok, ids, batches=None, finish=True, rid="r", **params):
    """Feed ``ids`` (one token per call, or in ``batches``); return the (delta, stop) list."""
    proc = OutputProcessor(tok)
    proc.add_request(rid, [1, 2, 3], SamplingParams(**params))
    batches = batches or [[i] for i in ids]
    outs = [proc.process(rid, b, False) for b in batches]
    if finish:
        outs.append(proc.process(rid, [], True))
    return outs


def joined(outs) -> str:
    return "".join(d for d, _ in outs)


# -- incremental detokenization -----------------------------------------------------------

def test_multibyte_characters_split_across_tokens_are_never_emitted_in_halves(tok):
    ids = ids_of(tok, *MULTILINGUAL)
    assert any("\ufffd" in tok.decode([i]) for i in ids)   # the test data does split chars
    outs = run(tok, ids)
    assert all("\ufffd" not in d for d, _ in outs)
    assert joined(outs) == tok.decode(ids)


def test_every_delta_is_emitted_as_soon_as_its_characters_are_complete(tok):
    ids = ids_of(tok, "ab", " 😀", " c")
    deltas = [d for d, _ in run(tok, ids, finish=False)]
    assert deltas[0] == "ab" and deltas[-1] == " c"
    assert "".join(deltas) == "ab 😀 c"


def test_leading_spaces_are_kept(tok):
    ids = ids_of(tok, " hello", " world")
    assert joined(run(tok, ids)) == " hello world"


def test_incomplete_character_at_the_end_is_flushed_on_finish(tok):
    ids = ids_of(tok, "ok 😀")[:-1]                    # drop the emoji's last fragment
    outs = run(tok, ids)
    assert "\ufffd" not in joined(outs[:-1])
    assert joined(outs) == tok.decode(ids) and joined(outs).endswith("\ufffd")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tok, skip):
    ids = ids_of(tok, " hi") + [tok.eos_token_id] + ids_of(tok, " there")
    outs = run(tok, ids, skip_special_tokens=skip)
    assert joined(outs) == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in joined(outs)) is not skip


def test_decode_window_stays_short_over_a_long_output(tok):
    seen = []

    class Recording:
        def decode(self, ids, skip_special_tokens):
            seen.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = ids_of(tok, *MULTILINGUAL) * 40                # ~1,500 tokens
    proc = OutputProcessor(Recording())
    proc.add_request("r", [], SamplingParams())
    text = "".join(proc.process("r", [i], False)[0] for i in ids)
    assert text == tok.decode(ids)
    assert max(seen) <= 16


@pytest.fixture(scope="module")
def pool(tok) -> list[int]:
    """Token ids that split characters, special tokens and ordinary text."""
    fragments = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]   # ~300
    return sorted(set(ids_of(tok, *MULTILINGUAL) + [0, 1, 2] + fragments))


def draw_batches(data, pool) -> tuple[list[int], list[list[int]]]:
    ids = data.draw(st.lists(st.one_of(st.sampled_from(pool), st.integers(0, 49151)),
                             max_size=40))
    cuts = sorted(data.draw(st.sets(st.integers(0, len(ids)), max_size=8)))
    edges = [0, *cuts, len(ids)]
    return ids, [ids[a:b] for a, b in zip(edges, edges[1:], strict=False)]


_FIXTURES_OK = settings(deadline=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(_FIXTURES_OK, max_examples=150)
@given(data=st.data(), skip=st.booleans())
def test_any_token_sequence_in_any_batching_joins_to_the_full_decode(tok, pool, data, skip):
    ids, batches = draw_batches(data, pool)
    outs = run(tok, ids, batches=batches, skip_special_tokens=skip)
    assert joined(outs) == tok.decode(ids, skip_special_tokens=skip)


class WindowDecodesOnly:
    """The tokenizer with only ``decode``: the OutputProcessor's Python window decodes."""

    def __init__(self, tok):
        self.decode = tok.decode


def test_a_fast_tokenizer_streams_through_rust(tok):
    assert OutputProcessor(tok)._rust is not None
    assert OutputProcessor(WindowDecodesOnly(tok))._rust is None


@settings(_FIXTURES_OK, max_examples=150)
@given(data=st.data(), skip=st.booleans())
def test_rust_stream_and_window_decodes_emit_the_same_deltas(tok, pool, data, skip):
    """Clients see the same deltas, step by step, whichever decoder runs."""
    ids, batches = draw_batches(data, pool)
    stop = ["STOP", "\n\n"] if data.draw(st.booleans()) else None
    fast = run(tok, ids, batches=batches, skip_special_tokens=skip, stop=stop)
    window = run(WindowDecodesOnly(tok), ids, batches=batches, skip_special_tokens=skip,
                 stop=stop)
    assert fast == window


@settings(_FIXTURES_OK, max_examples=60)
@given(data=st.data())
def test_emitted_text_does_not_depend_on_batching(tok, pool, data):
    ids, batches = draw_batches(data, pool)
    stop = ["STOP", "\n\n"]
    one_by_one = [d for d, _ in run(tok, ids, finish=False, stop=stop)]
    batched = [d for d, _ in run(tok, ids, batches=batches, finish=False, stop=stop)]
    ends = [sum(len(b) for b in batches[:k + 1]) for k in range(len(batches))]
    assert ["".join(batched[:k + 1]) for k in range(len(batches))] == [
        "".join(one_by_one[:e]) for e in ends]


# -- stop strings ---------------------------------------------------------------------------

def test_stop_string_inside_one_token_truncates_before_it(tok):
    ids = ids_of(tok, "Sure", " the", " answer", " is", " 42.")
    outs = run(tok, ids, finish=False, stop=[" answer"])
    assert [d for d, _ in outs[:3]] == ["Sure", " the", ""]
    assert [s for _, s in outs] == [False, False] + [True] * (len(ids) - 2)
    assert joined(outs) == "Sure the"


def test_stop_string_spanning_tokens_is_never_leaked(tok):
    ids = ids_of(tok, "Done", " ST", "O", "P", " after")
    outs = run(tok, ids, finish=False, stop=["STOP"])
    assert [d for d, _ in outs[:4]] == ["Done", " ", "", ""]
    assert outs[3][1] is True
    assert joined(outs) == "Done "


def test_held_back_partial_match_is_released_when_it_is_not_a_stop(tok):
    ids = ids_of(tok, "A", " ST", "ONE", " wall")
    outs = run(tok, ids, finish=False, stop=["STOP"])
    assert [d for d, _ in outs] == ["A", " ", "STONE", " wall"]
    assert not any(s for _, s in outs)


def test_held_back_partial_match_is_flushed_when_finished_for_another_reason(tok):
    ids = ids_of(tok, "A", " ST")
    outs = run(tok, ids, stop=["STOP"])
    assert [d for d, _ in outs] == ["A", " ", "ST"]
    assert joined(outs) == tok.decode(ids) and not outs[-1][1]


def test_earliest_of_several_stop_strings_wins_within_one_batch(tok):
    ids = ids_of(tok, "one", " two", " three", " four")
    outs = run(tok, ids, batches=[ids], finish=False, stop=[" four", " two"])
    assert outs == [("one", True)]


def test_stop_string_with_a_split_emoji_leaks_no_fragment(tok):
    ids = ids_of(tok, "hi", " 😀", " bye")
    outs = run(tok, ids, finish=False, stop=["😀"])
    assert joined(outs) == "hi " and all("\ufffd" not in d for d, _ in outs)


def test_stop_string_at_the_very_start_emits_nothing(tok):
    outs = run(tok, ids_of(tok, "Stop", " now"), finish=False, stop=["Stop"])
    assert outs == [("", True), ("", True)]


def test_stop_hit_together_with_finish_still_reports_the_stop(tok):
    proc = OutputProcessor(tok)
    proc.add_request("r", [], SamplingParams(stop=["END"]))
    assert proc.process("r", ids_of(tok, "text", " END", " x"), True) == ("text ", True)


# -- resumed requests ----------------------------------------------------------------------

@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 6])
def test_resumed_request_emits_only_the_new_text(tok, split):
    # splits fall inside the emoji (held U+FFFD) and inside the partial stop (held " ST")
    ids = ids_of(tok, "go", " 😀", " ST", "ONE", " ST", "OP", " tail")
    full = run(tok, ids, finish=False, stop=["STOP"])
    proc = OutputProcessor(tok)
    proc.add_request("r", [7, 8], SamplingParams(stop=["STOP"]), output_token_ids=ids[:split])
    resumed = [proc.process("r", [i], False) for i in ids[split:]]
    assert resumed == full[split:]
    assert joined(full[:split]) + joined(resumed) == "go 😀 STONE "


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 6])
def test_resume_given_the_emitted_text_continues_exactly_where_the_run_left(tok, split):
    ids = ids_of(tok, "go", " 😀", " ST", "ONE", " ST", "OP", " tail")
    full = run(tok, ids, finish=False, stop=["STOP"])
    proc = OutputProcessor(tok)
    proc.add_request("r", [7, 8], SamplingParams(stop=["STOP"]), output_token_ids=ids[:split],
                     emitted_text=joined(full[:split]))
    assert [proc.process("r", [i], False) for i in ids[split:]] == full[split:]


# An earlier run (another version, or one whose deltas were cut differently) emitted more or
# less than this processor would have after the same tokens: the replay log's text decides.
def resume(tok, ids, split, emitted, stop=("STOP",)):
    proc = OutputProcessor(tok)
    proc.add_request("r", [7], SamplingParams(stop=list(stop)), output_token_ids=ids[:split],
                     emitted_text=emitted)
    return [proc.process("r", [i], False) for i in ids[split:]] + [proc.process("r", [], True)]


def test_text_the_earlier_run_held_back_is_emitted_after_resume_not_lost(tok):
    ids = ids_of(tok, "A", " ST", "ONE", " wall")
    assert joined(run(tok, ids, stop=["STOP"])) == "A STONE wall"
    # the run held " ST" (this one would have sent " " and held "ST")
    assert "A" + joined(resume(tok, ids, 2, emitted="A")) == "A STONE wall"


def test_text_the_earlier_run_already_sent_is_not_sent_twice(tok):
    ids = ids_of(tok, "A", " ST", "ONE", " wall")
    # the run held nothing back (this one would have held "ST")
    assert "A ST" + joined(resume(tok, ids, 2, emitted="A ST")) == "A STONE wall"


def test_text_held_back_before_the_crash_can_still_become_the_stop_string(tok):
    ids = ids_of(tok, "A", " ST", "OP", " x")
    outs = resume(tok, ids, 2, emitted="A")
    assert outs[0] == (" ", True) and "A" + joined(outs) == "A "


def test_an_emitted_text_that_does_not_match_the_decode_holds_nothing(tok):
    ids = ids_of(tok, "A", " ST", "ONE")
    assert joined(resume(tok, ids, 2, emitted="something else")) == "ONE"


def test_resumed_request_emits_nothing_when_added(tok):
    ids = ids_of(tok, "already", " sent")
    proc = OutputProcessor(tok)
    proc.add_request("r", [1], SamplingParams(), output_token_ids=ids)
    assert proc.process("r", [], False) == ("", False)
    assert proc.process("r", ids_of(tok, " more"), True) == (" more", False)


# -- bookkeeping ----------------------------------------------------------------------------

def test_remove_forgets_and_duplicates_are_refused(tok):
    proc = OutputProcessor(tok)
    proc.add_request("r", [1], SamplingParams())
    with pytest.raises(ValueError, match="'r'"):
        proc.add_request("r", [1], SamplingParams())
    proc.remove("r")
    proc.remove("r")
    assert "r" not in proc and len(proc) == 0
    with pytest.raises(KeyError, match="unknown request 'r'"):
        proc.process("r", [5], False)
