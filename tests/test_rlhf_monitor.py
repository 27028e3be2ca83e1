"""ptx_numba.rlhf.reward_hacking_report: counts, frequencies, ratios and flags vs hand counts."""
import collections
import re

import pytest

import ptx_numba.rlhf as rl

COMMON = ("the a of and to is in that it for on with as was this be".split())
CONTENT = ("model answer question helpful response data code result user step".split())


def corpus(rng, n_texts, words_per_text, extra=(), extra_rate=0.0):
    texts = []
    for _ in range(n_texts):
        words = []
        for _ in range(words_per_text):
            if extra and rng.random() < extra_rate:
                words.append(str(rng.choice(extra)))
            elif rng.random() < 0.5:
                words.append(str(rng.choice(COMMON)))
            else:
                words.append(str(rng.choice(CONTENT)))
        # random capitalisation and punctuation, which the tokenizer must see through
        words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w
                 for w in words]
        texts.append(" ".join(w + str(rng.choice(["", "", ",", ".", "!"])) for w in words))
    return texts


def hand_count(texts):
    c = collections.Counter()
    n = 0
    for t in texts:
        words = re.findall(r"[a-z]+", t.lower())  # the corpora here are plain ASCII words
        c.update(words)
        n += len(words)
    return c, n


def test_fantastic_is_flagged_and_common_words_are_not(rng):
    # 4,000 words a corpus: each common word occurs ~125 times, so a chance ratio >= 2 is a
    # 5-sigma event (at 1,200 words it happened for 5 of 300 seeds tried).
    policy = corpus(rng, 80, 50, extra=("fantastic",), extra_rate=0.05)
    base = corpus(rng, 80, 50, extra=("fantastic",), extra_rate=0.003)
    base.append("a fantastic day")  # at least one base occurrence
    report = rl.reward_hacking_report(policy, base)
    by_term = {r.term: r for r in report}
    assert by_term["fantastic"].flagged
    assert not by_term["the"].flagged
    assert [r.term for r in report if r.flagged] == ["fantastic"]
    assert report[0].term == "fantastic"

    pc, pn = hand_count(policy)
    bc, bn = hand_count(base)
    for term in ("fantastic", "the", "model"):
        r = by_term[term]
        assert (r.policy_count, r.base_count) == (pc[term], bc[term])
        assert r.policy_per_1k == pytest.approx(1000 * pc[term] / pn, rel=1e-12)
        assert r.base_per_1k == pytest.approx(1000 * bc[term] / bn, rel=1e-12)
        assert r.ratio == pytest.approx((pc[term] / pn) / (bc[term] / bn), rel=1e-12)
    # every word of either corpus is reported, sorted by ratio
    assert set(by_term) == set(pc) | set(bc)
    ratios = [r.ratio for r in report]
    assert ratios == sorted(ratios, reverse=True)


def test_terms_thresholds_and_zero_base_count(rng):
    policy = ["Fantastic! Truly FANTASTIC.", "fantastic, fantastic; fantastic", "I hope this helps"]
    base = ["the base model writes plainly", "nothing here is fantastic-free"]
    report = rl.reward_hacking_report(policy, base, ["fantastic", "I hope this helps", "plainly",
                                                     "absent"], min_ratio=2.0, min_count=5)
    r = {x.term: x for x in report}
    assert set(r) == {"fantastic", "i hope this helps", "plainly", "absent"}
    n_p, n_b = 10, 10
    assert r["fantastic"].policy_count == 5 and r["fantastic"].base_count == 1
    assert r["fantastic"].ratio == pytest.approx((5 / n_p) / (1 / n_b))
    assert r["fantastic"].flagged
    # a phrase never in the base corpus: the base count is taken as 0.5 (a finite ratio)
    assert r["i hope this helps"].policy_count == 1 and r["i hope this helps"].base_count == 0
    assert r["i hope this helps"].base_per_1k == 0.0
    assert r["i hope this helps"].ratio == pytest.approx((1 / n_p) / (0.5 / n_b))
    assert r["i hope this helps"].ratio >= 2.0
    assert not r["i hope this helps"].flagged  # the ratio is 2, but it is used only once
    assert r["absent"].ratio == 0.0 and not r["absent"].flagged
    assert r["plainly"].policy_count == 0
    # the flag needs both the ratio and the count
    assert not rl.reward_hacking_report(policy, base, ["fantastic"], min_count=6)[0].flagged
    assert not rl.reward_hacking_report(policy, base, ["fantastic"], min_ratio=100)[0].flagged
    # phrases never span two texts
    assert rl.reward_hacking_report(["a b", "c d"], ["x"], ["b c"])[0].policy_count == 0


def test_tokenize_rule():
    assert rl.tokenize("Don't STOP—it’s 42 x_y, Über!") == ["don't", "stop", "it’s", "42", "x",
                                                             "y", "über"]
    assert rl.tokenize("  ...  ") == []


def test_records_print_and_filter():
    rep = rl.reward_hacking_report(["great great great great great"], ["great day"], None)
    assert "TermFrequency(term='great'" in str(rep[0])
    assert rep[0]._asdict()["flagged"] is True


def test_bad_input():
    ok = ["some words"]
    with pytest.raises(TypeError, match="list or tuple of strings"):
        rl.reward_hacking_report("a single string", ok)
    with pytest.raises(TypeError, match="list or tuple of strings"):
        rl.reward_hacking_report(ok, None)
    with pytest.raises(TypeError, match=r"base_texts\[1\] must be a string"):
        rl.reward_hacking_report(ok, ["x", 3])
    with pytest.raises(TypeError, match=r"policy_texts\[1\] is a list.*flat"):
        rl.reward_hacking_report(["x", ["y", "z"]], ok)  # ragged nesting
    with pytest.raises(ValueError, match="base_texts contain no word"):
        rl.reward_hacking_report(ok, ["", "!!"])
    with pytest.raises(ValueError, match="policy_texts contain no word"):
        rl.reward_hacking_report([], ok)
    with pytest.raises(TypeError, match="terms"):
        rl.reward_hacking_report(ok, ok, "words")
    with pytest.raises(TypeError, match="term must be a string"):
        rl.reward_hacking_report(ok, ok, ["words", 1])
    with pytest.raises(ValueError, match="no word"):
        rl.reward_hacking_report(ok, ok, ["?"])
    with pytest.raises(ValueError, match="min_ratio"):
        rl.reward_hacking_report(ok, ok, min_ratio=0)
    with pytest.raises(ValueError, match="min_count"):
        rl.reward_hacking_report(ok, ok, min_count=0)
    with pytest.raises(TypeError, match="min_count"):
        rl.reward_hacking_report(ok, ok, min_count=2.5)
    texts = ["x y"]
    rl.reward_hacking_report(texts, texts)
    assert texts == ["x y"]
