"""Selection: the lazy greedy makes the official loop's picks; window orders by hand-worked examples."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from iterit.selection.embedding import lazy_embedding_greedy
from iterit.selection.greedy import lazy_greedy, reference_greedy
from iterit.selection.tfidf import response_texts, tfidf_matrix
from iterit.selection.window import reorder, select_window


def test_greedy_hand_worked():
    w = sp.csr_matrix(np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [1.0, 0.0, 0.0]]))
    ifd = np.array([0.5, 0.6, 0.4])
    # scores 0.7, 0.84, 0.4 -> pick 1; columns 1, 2 decay to 0.1: doc 0 = 0.5 x (0.6 + 0.08) = 0.34,
    # doc 2 = 0.4 -> pick 2; column 0 decays: doc 0 = 0.5 x (0.06 + 0.08) = 0.07.
    for fn in (lazy_greedy, reference_greedy):
        picks, gains = fn(ifd, w, 3, 0.1)
        assert picks == [1, 2, 0]
        np.testing.assert_allclose(gains, [0.84, 0.4, 0.07])


def test_ties_go_to_the_lowest_position():
    w = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    for fn in (lazy_greedy, reference_greedy):
        assert fn(np.full(4, 0.5), w, 4, 0.0)[0] == [0, 1, 2, 3]


@pytest.mark.parametrize("decay", [0.1, 0.0, 0.5, 1.0])
def test_lazy_greedy_equals_the_official_loop_on_real_text(real_responses, decay):
    rng = np.random.default_rng(7)
    ifd = rng.uniform(0.2, 1.0, size=len(real_responses))
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = response_texts(real_responses, "<|im_end|>")
    # The official pipeline end to end: scikit-learn's matrix and the official loop ...
    want = reference_greedy(ifd, TfidfVectorizer(ngram_range=(1, 3)).fit_transform(texts), 60, decay)
    # ... against iterit's: its own exact TF-IDF and the lazy greedy.
    x = tfidf_matrix(texts, "exact")
    got = lazy_greedy(ifd, x, 60, decay)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    if decay == 1.0:  # no diversity: the IFD x mass order
        assert got[0] == list(np.argsort(-(ifd * np.asarray(x.sum(axis=1)).ravel()), kind="stable")[:60])


def test_exact_tfidf_is_scikit_learns_matrix(real_responses):
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = response_texts(real_responses[:300], "<|im_end|>") + ["", "a", "Ok ok OK"]  # empty rows too
    want = TfidfVectorizer(ngram_range=(1, 3)).fit_transform(texts).tocsr()
    got = tfidf_matrix(texts, "exact")
    assert got.shape == want.shape and got.nnz == want.nnz  # the same vocabulary, the same entries
    for i in range(len(texts)):  # the same weights per row (columns in another order)
        np.testing.assert_allclose(np.sort(got[i].data), np.sort(want[i].data), rtol=1e-12)


def test_hashed_tfidf_matches_exact_weights_without_collisions():
    texts = ["the cat sat on the mat", "a dog sat on the log", "the cat and the dog"]
    exact, hashed = tfidf_matrix(texts, "exact"), tfidf_matrix(texts, "hashed", workers=1)
    # Same multiset of weights per row (columns differ: hashed n-grams vs a vocabulary).
    for i in range(3):
        np.testing.assert_allclose(sorted(exact[i].data), sorted(hashed[i].data), rtol=1e-6)


def _reference_hash_counts(texts: list[str]) -> list[dict[int, int]]:
    """hash_counts spelled out in Python: TfidfVectorizer's regex tokens, FNV-1a per word, splitmix."""
    from collections import Counter

    from iterit.selection.tfidf import _WORD, HASH_FEATURES

    m = (1 << 64) - 1

    def mix(a, b):
        x = ((a * 0x9E3779B97F4A7C15) & m) ^ ((b + 0xBF58476D1CE4E5B9) & m)
        x ^= x >> 31
        x = (x * 0xBF58476D1CE4E5B9) & m
        return x ^ (x >> 29)

    def word(w):
        h = 0xCBF29CE484222325
        for ch in w:
            h = ((h ^ ord(ch)) * 0x100000001B3) & m
        return mix(h, len(w))

    rows = []
    for text in texts:
        w = [word(t) for t in _WORD.findall(text.lower())]
        keys = [mix(a, 1) for a in w] + [mix(mix(a, b), 2) for a, b in zip(w, w[1:])]
        keys += [mix(mix(mix(a, b), c), 3) for a, b, c in zip(w, w[1:], w[2:])]
        rows.append(dict(Counter(key & (HASH_FEATURES - 1) for key in keys)))
    return rows


def test_hashed_counts_tokenise_as_the_regex_does(real_responses):
    """The compiled scan finds exactly TfidfVectorizer's tokens, Unicode included: accents, Greek final
    sigma, dotted I (lowercases to 2 code points), CJK, other digits, underscores, combining marks,
    emoji, lone surrogates, texts too short for any token."""
    from iterit.selection.tfidf import hash_counts

    texts = [
        "Hello world, hello_World 42 a b cc",
        "",
        "x",
        "ΣΑΣ ΟΔΟΣ İstanbul café naïve 東京タワー 123abc ９９ ½ x²",
        "\ud800ab cd\udfff ef",
        "e\u0301te\u0301 co\u0308operate",
        "🙂🙂 ok ok ok ok",
    ] + list(real_responses)
    x = hash_counts(texts)
    for i, want in enumerate(_reference_hash_counts(texts)):
        cols, counts = x.indices[x.indptr[i] : x.indptr[i + 1]], x.data[x.indptr[i] : x.indptr[i + 1]]
        assert np.all(np.diff(cols) > 0)  # sorted, one entry per column
        assert dict(zip(cols.tolist(), counts.tolist())) == want, texts[i][:60]


def test_stack_rows_is_vstack():
    from iterit.selection.tfidf import stack_rows

    parts = [sp.random(n, 50, density=0.1, format="csr", random_state=n) for n in (3, 0, 7, 1)]
    want = sp.vstack(parts, format="csr")
    got = stack_rows(list(parts))
    assert (got != want).nnz == 0 and got.shape == want.shape


def test_embedding_greedy_prefers_the_unlike():
    e = np.array([[1, 0], [0.99, 0.141], [0, 1]], dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    picks, gains = lazy_embedding_greedy(np.array([0.9, 0.85, 0.5]), e, 3)
    # 0 first (highest IFD); 1 is nearly 0 (score 0.85 x 0.01), 2 is orthogonal (0.5 x 1).
    assert picks == [0, 2, 1] and gains[1] == pytest.approx(0.5)


def naive_embedding_greedy(ifd, emb, k):
    picks, gains = [], []
    max_sim = np.zeros(len(ifd), dtype=np.float32)
    for _ in range(k):
        s = ifd * (1.0 - max_sim.astype(np.float64))
        s[picks] = -np.inf
        best = int(np.argmax(s))
        picks.append(best)
        gains.append(float(s[best]))
        max_sim = np.maximum(max_sim, emb @ emb[best])
    return picks, gains


@pytest.mark.parametrize("block", [3, 512])
def test_embedding_greedy_equals_the_plain_greedy(block):
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((8, 16)).astype(np.float32)
    emb = centers[rng.integers(0, 8, 400)] + 0.5 * rng.standard_normal((400, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ifd = rng.uniform(0.3, 1.0, 400)
    want = naive_embedding_greedy(ifd, emb, 40)
    got = lazy_embedding_greedy(ifd, emb, 40, block=block, rows_per_product=64)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_embedding_greedy_on_float16_and_memory_mapped_rows_through_the_torch_path(tmp_path):
    """Embeddings as scoring stores them with embedding_dtype float16, memory-mapped: the same picks as the
    plain greedy on the same values widened, the blocked products through torch on the CPU (the code a
    GPU driver runs), progress counting every pick."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((6, 24)).astype(np.float32)
    emb = centers[rng.integers(0, 6, 700)] + 0.6 * rng.standard_normal((700, 24)).astype(np.float32)
    emb16 = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    np.save(tmp_path / "e.npy", emb16)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    ifd = rng.uniform(0.3, 1.0, 700)
    want = naive_embedding_greedy(ifd, emb16.astype(np.float32), 60)
    calls = []
    got = lazy_embedding_greedy(
        ifd, mapped, 60, block=7, rows_per_product=100, device="cpu", on_picks=calls.append
    )
    assert got[0] == want[0] and sum(calls) == 60 and len(calls) >= 60 // 7
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    assert (
        lazy_embedding_greedy(ifd[:5], mapped[:5], 50)[0]
        == naive_embedding_greedy(ifd[:5], emb16[:5].astype(np.float32), 5)[0]
    )  # k above N: every document, once


def test_read_embeddings_keeps_the_stored_dtype_and_aligns_with_the_window(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iterit.errors import IteritError
    from iterit.selection.stage import read_embeddings

    (tmp_path / "scores").mkdir()
    for name, ids, reject, base in (("a", ["a", "b"], ["", ""], 1), ("b", ["c", "d"], ["", "too_long"], 3)):
        vals = np.repeat(np.arange(base, base + 2, dtype=np.float16), 3)  # row i holds base + i, 3 times
        pq.write_table(
            pa.table(
                {
                    "id": ids,
                    "ifd": [0.5, 0.6],
                    "reject": reject,
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vals, pa.float16()), 3),
                }
            ),
            tmp_path / "scores" / f"{name}.parquet",
        )
    got = read_embeddings(str(tmp_path / "scores"), ["d", "c", "x", "a", "b"])
    assert got.dtype == np.float16 and got.shape == (5, 3)
    assert got[:, 0].tolist() == [0, 3, 0, 1, 2]  # d rejected, x never scored: zeros
    pq.write_table(pa.table({"id": ["a"], "ifd": [0.5]}), tmp_path / "plain.parquet")
    with pytest.raises(IteritError, match="needs the embedding column"):
        read_embeddings(str(tmp_path / "plain.parquet"), ["a"])


def test_select_with_the_embedding_method_reads_float16_scores_in_arrow(tmp_path):
    """run_selection (`iterit select --method embedding`) end to end on files: a samples file, a scores
    folder whose embeddings are float16 with a reject among them; the picks are the plain greedy's."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from iterit.data import SAMPLE_SCHEMA
    from iterit.selection.stage import run_selection

    n, d, k = 300, 16, 20
    rng = np.random.default_rng(11)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    ifd = rng.uniform(0.2, 0.95, n)
    ids = [f"s{i}" for i in range(n)]
    rows = [
        {"id": i, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "source": "t", "row": r}
        for r, i in enumerate(ids)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), tmp_path / "samples.parquet")
    (tmp_path / "scores").mkdir()
    reject = ["" if i != 5 else "too_long" for i in range(n)]
    for part, sl in (("a", slice(0, 150)), ("b", slice(150, n))):
        pq.write_table(
            pa.table(
                {
                    "id": ids[sl],
                    "ifd": ifd[sl],
                    "reject": reject[sl],
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(emb[sl].ravel(), pa.float16()), d
                    ),
                }
            ),
            tmp_path / "scores" / f"{part}.parquet",
        )
    out = run_selection(
        str(tmp_path / "samples.parquet"),
        str(tmp_path / "scores"),
        lambda _: k,
        "embedding",
        str(tmp_path / "sel"),
    )
    with open(out["selection"]) as f:
        got = [json.loads(line)["id"] for line in f]
    keep = np.array([i for i in range(n) if i != 5])  # the reject is never a candidate
    want, _ = naive_embedding_greedy(ifd[keep], emb[keep].astype(np.float32), k)
    assert got == [ids[keep[j]] for j in want] and out["scored"] == n - 1


def test_window_order_hand_worked():
    ifd = np.array([0.9, 1.2, np.nan, 0.5, 0.7, 0.3])
    wo = select_window(ifd, 2, "ifd")
    # candidates (finite, < 1): 0, 3, 4, 5; by IFD: 0, 4, 3, 5. Others (1.2, NaN) keep their order.
    assert wo.order == [0, 4, 1, 2, 3, 5]
    assert wo.status == ["selected", "selected", "other", "other", "candidate", "candidate"]
    assert wo.picks == [0, 4] and wo.gains == [0.9, 0.7]
    rnd = select_window(ifd, 2, "random", seed=3)
    assert sorted(rnd.order) == list(range(6)) and rnd.status.count("selected") == 2
    assert rnd.order[2:3] == [2] or 2 not in rnd.picks  # NaN is never picked
    longest = select_window(ifd, 2, "longest", n_response_tokens=np.array([5, 50, 9, 7, 30, 1]))
    assert longest.picks == [1, 4]  # baselines rank every scored sample, ifd >= 1 included
    assert select_window(ifd, 2, "full").picks == [0, 1, 3, 4, 5]


def test_reorder_keeps_the_tail():
    current = list("abcdefg")
    new, wo = reorder(current, np.array([0.2, 0.8, 1.5, 0.5]), 2, "ifd")
    assert new.to_pylist() == ["b", "d", "c", "a", "e", "f", "g"]
    assert wo.status == ["selected", "selected", "other", "candidate"]
    with pytest.raises(ValueError):
        reorder(current[:2], np.array([0.2, 0.1, 0.3]), 1, "ifd")


def test_select_command_writes_the_contracted_files(tmp_path, cli, real_responses):
    import pyarrow.parquet as pq

    data = tmp_path / "data.jsonl"
    rows = [
        {"id": f"s{i}", "instruction": f"question {i}", "output": r}
        for i, r in enumerate(real_responses[:200])
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(0)
    ifd = rng.uniform(0.3, 1.2, size=200)
    scores = tmp_path / "scores.jsonl"
    scores.write_text(
        "".join(json.dumps({"id": f"s{i}", "ifd": float(x)}) + "\n" for i, x in enumerate(ifd) if i != 5)
    )  # s5 has no score: never picked, placed with the others
    code, out, err = cli(
        [
            "select",
            "--data",
            str(data),
            "--scores",
            str(scores),
            "--ratio",
            "0.05",
            "--output",
            str(tmp_path / "sel"),
        ],
    )
    assert code == 0, err
    assert "selected 10 of 200 samples" in out
    picks = [json.loads(line) for line in open(tmp_path / "sel" / "selection.jsonl")]
    assert [p["rank"] for p in picks] == list(range(10)) and set(picks[0]) == {"id", "rank", "ifd", "gain"}
    # The same picks as the official loop on the same TF-IDF (responses, no eos without --model).
    cand = [i for i in range(200) if i != 5 and ifd[i] < 1]
    x = tfidf_matrix([real_responses[i] for i in cand], "exact")
    want, gains = reference_greedy(ifd[cand], x, 10, 0.1)
    assert [p["id"] for p in picks] == [f"s{cand[j]}" for j in want]
    np.testing.assert_allclose([p["gain"] for p in picks], gains, rtol=1e-12)
    order = pq.read_table(tmp_path / "sel" / "order.parquet").to_pylist()
    assert [r["position"] for r in order] == list(range(200))
    statuses = [r["status"] for r in order]
    n_other = sum(1 for i in range(200) if i == 5 or ifd[i] >= 1)
    assert statuses == ["selected"] * 10 + ["other"] * n_other + ["candidate"] * (190 - n_other)
    tail = [r["ifd"] for r in order[10 + n_other :]]
    assert tail == sorted(tail, reverse=True)
    assert "s5" in [r["id"] for r in order[10 : 10 + n_other]]

    code, out, _ = cli(
        [
            "select",
            "--data",
            str(data),
            "--scores",
            str(scores),
            "--ratio",
            "7",
            "--method",
            "random",
            "--output",
            str(tmp_path / "rnd"),
        ],
    )
    assert code == 0 and "selected 7 of 200" in out


@pytest.mark.parametrize(
    "scores_text,ratio,message",
    [
        ('{"id": "s0"}\n', "0.1", "needs an 'id' and a numeric 'ifd'"),
        ("not json\n", "0.1", "line 1: not JSON"),
        ('{"id": "s0", "ifd": 0.5}\n', "1.5", "--ratio 1.5"),
    ],
)
def test_select_errors(tmp_path, cli, scores_text, ratio, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "s0", "instruction": "q", "output": "a"}\n')
    scores = tmp_path / "s.jsonl"
    scores.write_text(scores_text)
    code, _, err = cli(
        [
            "select",
            "--data",
            str(data),
            "--scores",
            str(scores),
            "--ratio",
            ratio,
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert code == 2 and message in err


def test_random_selections_of_different_seeds_and_iterations_never_coincide():
    """iterit compare runs seeds 42, 43, 44 for 3 iterations: every (seed, iteration) draws its own
    random order (with seed + e, seed 42's iteration 1 was seed 43's iteration 0)."""
    from iterit.config import iteration_rng

    ifd = np.linspace(0.1, 0.9, 40)
    orders = {
        (seed, e): tuple(select_window(ifd, 4, "random", seed=seed, iteration=e).order)
        for seed in (42, 43, 44)
        for e in range(3)
    }
    assert len(set(orders.values())) == len(orders)
    # the draw is the run's one stream for that iteration, the one its training order comes from too
    assert orders[(42, 1)] == tuple(iteration_rng(42, 1).permutation(40).tolist())


def test_a_row_scores_the_same_in_every_block_and_at_every_factor_one():
    """The lazy greedy's exactness leans on a row getting one value wherever it is scored: the initial
    scores (computed per shard, in parallel) are the re-evaluation's sum with every factor 1."""
    from iterit.selection.greedy import _row_sum, initial_scores

    x = sp.random(300, 50, density=0.2, format="csr", random_state=3, dtype=np.float32)
    ifd = np.random.default_rng(3).uniform(0.2, 1.0, x.shape[0])
    whole = initial_scores(ifd, x)
    assert np.array_equal(
        np.concatenate([initial_scores(ifd[:97], x[:97]), initial_scores(ifd[97:], x[97:])]), whole
    )
    ones = np.ones(x.shape[1])
    for i in range(0, x.shape[0], 7):
        assert whole[i] == ifd[i] * _row_sum(x.indices, x.data, x.indptr[i], x.indptr[i + 1], ones)


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_lazy_greedy_over_shards_in_any_order_makes_the_official_picks(real_responses, shards):
    """Rows split over shards (as the cluster writes them: each shard a run of candidates in any order)
    give the official loop's picks and gains."""
    from iterit.selection.greedy import initial_scores, lazy_greedy_rows

    x = tfidf_matrix(response_texts(real_responses, "<|im_end|>"), "exact")
    n = x.shape[0]
    ifd = np.random.default_rng(5).uniform(0.2, 1.0, n)
    owner = np.random.default_rng(shards).permutation(n)  # shard rows hold candidates in shuffled order
    parts, shard_of, local_of = [], np.empty(n, np.int32), np.empty(n, np.int64)
    for s, cands in enumerate(np.array_split(owner, shards)):
        part = x[cands]
        parts.append((part.indptr.astype(np.int64), part.indices, part.data))
        shard_of[cands], local_of[cands] = s, np.arange(len(cands))
    seen = []
    want = reference_greedy(ifd, x, 50, 0.1)
    got = lazy_greedy_rows(
        ifd, parts, shard_of, local_of, initial_scores(ifd, x), x.shape[1], 50, 0.1, on_picks=seen.append
    )
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    assert sum(seen) == 50 and len(seen) == 50  # progress every max(1, k // 200) picks


def test_coded_rows_hold_every_count_and_column_escapes_included():
    """Columns 0 and 2^24 - 1, gaps past 17 bits, counts past 7 bits and an empty row come back whole."""
    from iterit.selection.coded import MAX_GAP, decode_row, encode_counts

    rows = [
        ([0, 5, 6], [1, 127, 128]),
        ([], []),
        ([3, 3 + MAX_GAP, 4 + 2 * MAX_GAP, (1 << 24) - 1], [2, 1, 70_000, 9]),
    ]
    indptr = np.cumsum([0] + [len(c) for c, _ in rows])
    x = sp.csr_matrix(
        (np.concatenate([n for _, n in rows]).astype(np.float32), np.concatenate([c for c, _ in rows]).astype(np.int32), indptr),
        shape=(3, 1 << 24),
    )  # fmt: skip
    starts, codes = encode_counts(x)
    for r, (cols, counts) in enumerate(rows):
        got_cols, got_counts = decode_row(codes, starts[r], starts[r + 1])
        assert got_cols.tolist() == cols and got_counts.tolist() == counts
    # 3 bytes an entry, 9 for an escape: 128 (count), 70,000 (count and gap), 2^24 - 1 (gap)
    assert starts.tolist() == [0, 3 + 3 + 9, 15, 15 + 3 + 3 + 9 + 9]


def test_the_coded_greedy_makes_the_official_picks_on_counts_x_idf_over_norm(real_responses):
    """The hashed mode's greedy (coded rows, weights computed as it reads them) = the official loop on the
    float64 matrix counts x idf / norm, picks and gains, with escapes in the codes."""
    from iterit.selection.coded import coded_rows
    from iterit.selection.greedy import lazy_greedy_coded
    from iterit.selection.tfidf import HASH_FEATURES, hash_counts, smooth_idf

    x = hash_counts(response_texts(real_responses, "<|im_end|>"))
    x.data[::41] = 300.0  # counts past 7 bits: escapes
    idf = smooth_idf(np.bincount(x.indices, minlength=HASH_FEATURES), x.shape[0])
    ifd = np.random.default_rng(7).uniform(0.2, 1.0, x.shape[0])
    rows = coded_rows(x, idf, ifd)
    w = sp.diags(1 / rows.norms) @ x.astype(np.float64).multiply(idf.astype(np.float64)).tocsr()
    np.testing.assert_allclose(np.sqrt(w.multiply(w).sum(axis=1)).A1, 1.0, rtol=1e-12)
    want = reference_greedy(ifd, w, 60, 0.1)
    seen = []
    got = lazy_greedy_coded(ifd, rows, 60, 0.1, on_picks=seen.append)
    assert got[0] == want[0] and sum(seen) == 60
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)


def test_window_inputs_align_arrow_ids_with_a_scores_table(tmp_path):
    """The driver keeps ids in Arrow: each id gets its own score row, NaN (and 0 tokens) without one,
    rejected rows are not scores, scored ids outside the window are counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iterit.errors import IteritError
    from iterit.selection.stage import score_table, unknown_ids, window_inputs

    path = tmp_path / "scores.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["c", "a", "zz", "b"],
                "ifd": [0.3, 0.1, 0.9, None],
                "n_response_tokens": [30, 10, 90, 20],
                "reject": ["", "", "", "too_long"],
            }
        ),
        path,
    )
    ids = pa.array(["a", "b", "c", "d"])
    table = score_table(str(path), ["id", "ifd", "n_response_tokens"])
    got = window_inputs(ids, table, "longest", str(path))
    np.testing.assert_array_equal(got["ifd"], [0.1, np.nan, 0.3, np.nan])
    assert got["n_response_tokens"].tolist() == [10, 0, 30, 0] and unknown_ids(table, ids) == 1
    assert window_inputs(ids.slice(2), table, "iterit", str(path))["ifd"].tolist()[0] == 0.3
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text('{"id": "b", "ifd": 0.2}\n')
    table = score_table(str(jsonl), ["id", "ifd", "n_response_tokens"])
    np.testing.assert_array_equal(
        window_inputs(ids, table, "iterit", str(jsonl))["ifd"], [np.nan, 0.2, np.nan, np.nan]
    )
    with pytest.raises(IteritError, match="method longest needs n_response_tokens"):
        window_inputs(ids, table, "longest", str(jsonl))
