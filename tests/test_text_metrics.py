"""Generation metrics: our ROUGE-L / BLEU / exact match against rouge-score and sacrebleu, the
prompt/reference split of dataset items, and the eval recipe's generation pass."""

import pytest

from tinytune.training.text_metrics import corpus_bleu, exact_match, generation_metrics, rouge_l

PREDS = [
    "The cat sat on the mat.",
    "A dog has four legs, and 3.5 tails!",
    "Fish live in water",
    "",
    "Hello there, friend! Hello there.",
    "x",
    "The sun is a star; 10-20 km/h &amp; more",
    "Bees make honey, honey, honey.",
]
REFS = [
    "the cat is on the mat",
    "A dog has four legs.",
    "Fish live in water.",
    "Nothing here",
    "Hello there, friend!",
    "completely different words",
    "The sun is a star at 10-20 km/h & more",
    "Bees make honey.",
]


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for p, r in zip(PREDS, REFS):
        assert rouge_l(p, r) == pytest.approx(scorer.score(r, p)["rougeL"].fmeasure, abs=1e-12), (p, r)


@pytest.mark.parametrize("sl", [slice(None), slice(0, 1), slice(3, 4), slice(5, 6), slice(1, 3), slice(4, 8)])
def test_corpus_bleu_matches_sacrebleu(sl):
    sacrebleu = pytest.importorskip("sacrebleu")
    want = sacrebleu.corpus_bleu(PREDS[sl], [REFS[sl]]).score
    assert corpus_bleu(PREDS[sl], REFS[sl]) == pytest.approx(want, abs=1e-9)


def test_exact_match_and_bundle():
    assert exact_match([" a b ", "c"], ["a b", "d"]) == 0.5
    m = generation_metrics(["same answer"], ["same answer"])
    assert m == {"exact_match": 1.0, "rouge_l": 1.0, "bleu": pytest.approx(0.0)}  # 2 tokens: no 3/4-grams
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        generation_metrics(["a", "b"], ["a"])
