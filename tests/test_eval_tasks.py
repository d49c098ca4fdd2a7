"""training/tasks.py, eval.py --task and train.py's eval.tasks, on tiny models in fp32 on CPU.

- The scoring primitives equal a hand computation from each family's full logits (atol 1e-5): next_token_logprobs
  (the shared-prompt path: the head at the last position only, through model.logits: Gemma2's softcap, Granite's
  scaling) and score_sequences (per-sample sums of the loss), packed into one row with cu_seqlens and as
  right-padded rows alike.
- MalayMMLU's two metrics and their category weighting equal a hand computation from the logits on the fixture.
- GSM8K's scoring of given completions: strict / flexible correctness, truncation counts, pass@N.
- Bad input: too-long prompts are counted and reported, never cut; the CLI's errors; --out refuses an existing file.
- train.py runs eval.tasks at each evaluation and logs their metrics to metrics.jsonl.
"""

import json
from pathlib import Path

import pytest
import torch

import eval as eval_script
import train
from data.tasks import GSMQuestion, MCQuestion, category_weighted, read_malaymmlu
from data.tokenizer import load_tokenizer
from model.llama import LlamaConfig, Llama
from training import checkpoint, tasks
from training.generation import Completion
from test_packed import FAMILIES, VOCAB, tiny_model

ATOL = 1e-5
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(params=[False, True], ids=["rows", "packed"])
def layout(request, monkeypatch):
    """Run the scoring both as right-padded rows and packed into one row with cu_seqlens."""
    monkeypatch.setattr(tasks, "packs_documents", lambda model, device: request.param)
    return request.param


def sequences(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_next_token_logprobs_equal_the_full_logits(family, layout):
    model = tiny_model(family).eval()
    contexts = sequences(7)
    candidates = [[1, 5, 9], [0], [3, 4], [95, 2, 7, 11], [8], [6, 6], [10, 20]]
    ours = tasks.next_token_logprobs(model, contexts, candidates, max_tokens=40)
    for ctx, cand, got in zip(contexts, candidates, ours):
        with torch.no_grad():
            want = model(torch.tensor([ctx]))[0, -1].float().log_softmax(-1)[cand]
        torch.testing.assert_close(torch.tensor(got), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefixes_are_computed_once_and_change_nothing(family):
    """k-shot prompts of one subject share their start: it runs once into a KV cache copied to every row, and each
    prompt's tail after it; the log-probabilities equal the full logits' (sliding windows and sinks included)."""
    model = tiny_model(family).eval()
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, VOCAB, (20,), generator=g).tolist()
    contexts = [prefix + t for t in sequences(5, seed=4)] + sequences(3, seed=5) + [prefix[:9] + [VOCAB - 1] * 3]
    candidates = [[1, 2, 3, 4]] * len(contexts)
    shared, alone = tasks.shared_prefix_groups(contexts, min_shared=8)
    assert shared == [(20, [i for i in sorted(range(5), key=lambda i: contexts[i])])] and len(alone) == 4
    widths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(tuple(args[0].shape))
                                           if isinstance(args[0], torch.Tensor) else None, with_kwargs=True)
    ours = tasks.next_token_logprobs(model, contexts, candidates, max_tokens=40, min_shared=8)
    hook.remove()
    assert widths[0] == (1, 20)  # the shared prefix, once
    for ctx, got in zip(contexts, ours):
        with torch.no_grad():
            want = model(torch.tensor([ctx]))[0, -1].float().log_softmax(-1)[[1, 2, 3, 4]]
        torch.testing.assert_close(torch.tensor(got), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_score_sequences_equal_summed_log_probabilities(family, layout):
    model = tiny_model(family).eval()
    seqs = sequences(9, seed=1)
    n_scored = [max(1, len(s) // 3) for s in seqs]
    ours = tasks.score_sequences(model, seqs, n_scored, max_tokens=48)  # several forwards
    for s, n, (logprob, count) in zip(seqs, n_scored, ours):
        with torch.no_grad():
            logp = model(torch.tensor([s[:-1]]))[0].float().log_softmax(-1)  # (T-1, V)
        want = logp[torch.arange(len(s) - 1), torch.tensor(s[1:])][-n:].sum()
        assert count == n
        torch.testing.assert_close(torch.tensor(logprob), want, atol=ATOL, rtol=0)


def test_forward_groups_stay_within_the_budget():
    lengths = [5, 17, 3, 9, 9, 30, 1]
    for packed in (False, True):
        groups = tasks.forward_groups(lengths, 20, packed)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            cost = sum(lengths[i] for i in g) if packed else len(g) * max(lengths[i] for i in g)
            assert cost <= 20 or len(g) == 1
            assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)


def test_one_token_choices_score_as_their_sequences():
    model = tiny_model("llama").eval()
    requests = [(ctx, [[1], [2], [3], [4]]) for ctx in sequences(5, seed=2)]
    shared = tasks.choice_scores(model, requests, max_tokens=64, progress=False, desc="")
    seqs = [ctx + c for ctx, conts in requests for c in conts]
    apart = tasks.score_sequences(model, seqs, [1] * len(seqs), max_tokens=64)
    torch.testing.assert_close(torch.tensor(shared).flatten(), torch.tensor([lp for lp, _ in apart]), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- tasks with a real tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def gpt2_model(tok, max_seq_len: int = 256) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48,
                              max_seq_len=max_seq_len))
    model.init_weights()
    return model.eval()


def test_malaymmlu_metrics_equal_a_hand_computation(gpt2):
    model = gpt2_model(gpt2)
    questions = read_malaymmlu(FIXTURES / "malaymmlu_sample.json")
    result = tasks.malaymmlu(model, gpt2, questions)
    first_ok, full_ok = {}, {}
    for q, record in zip(questions, result.records):
        prompt = "Berikut adalah soalan aneka pilihan tentang " + q.subject + ". Sila berikan jawapan sahaja.\n\n" \
                 + q.question + "\nJawapan:"
        with torch.no_grad():
            last = model(torch.tensor([gpt2.encode(prompt)]))[0, -1]
            letters = [gpt2.encode(c)[-1] for c in "ABCDE"[:len(q.choices)]]
            first = int(last[letters].argmax())
            means = []
            for option in q.choices:
                ids = gpt2.encode(prompt + option)
                logp = model(torch.tensor([ids]))[0, :-1].log_softmax(-1)
                means.append(float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()))
        assert record["first_token_pred"] == "ABCDE"[first]
        torch.testing.assert_close(torch.tensor(record["full_mean_logprobs"]), torch.tensor(means), atol=ATOL, rtol=0)
        assert record["full_pred"] == "ABCDE"[max(range(len(means)), key=means.__getitem__)]
        for counts, ok in ((first_ok, first == q.answer), (full_ok, record["full_pred"] == "ABCDE"[q.answer])):
            c, n = counts.get(q.category, (0, 0))
            counts[q.category] = (c + ok, n + 1)
    for name, counts in (("first_token", first_ok), ("full", full_ok)):
        # the official evaluator: sum over categories of n_cat * acc_cat, over all questions
        want = sum(n * (c / n) for c, n in counts.values()) / sum(n for _, n in counts.values())
        assert result.metrics[f"{name}_acc"] == pytest.approx(want, abs=1e-12)
        assert result.metrics[f"{name}_acc_by_category"] == {k: c / n for k, (c, n) in sorted(counts.items())}
    assert category_weighted({"a": (1, 4), "b": (3, 4), "c": (0, 2)}) == pytest.approx(4 / 10)


def test_malaymmlu_generative_scores_the_boxed_letter_of_each_sample(monkeypatch):
    tok = load_tokenizer("gpt2")
    tok.chat_template_name = "chatml"
    questions = read_malaymmlu(FIXTURES / "malaymmlu_sample.json")[:3]
    right = ["ABCDE"[q.answer] for q in questions]
    wrong = ["B" if r == "A" else "A" for r in right]
    answers = [[f"so \\boxed{{{right[0]}}}", "no box at all"],  # first right
               [f"\\boxed{{{wrong[1]}}}", f"maybe \\boxed{{{right[1]}}}"],  # only the second right
               [f"\\boxed{{{right[2]}}} or \\boxed{{{wrong[2]}}}", "\\boxed{Z}"]]  # ambiguous, then out of range
    seen = []

    def fake(model, prompts, max_new_tokens, **kwargs):
        seen.append(tok.decode(prompts[0]))
        return [Completion(tok.encode(answers[i // 2][i % 2]), stopped=i != 5) for i in range(len(prompts))]

    monkeypatch.setattr(tasks, "generate_completions", fake)
    r = tasks.malaymmlu_generative(gpt2_model(tok), tok, questions, samples=2, temperature=0.7)
    assert tasks.BOXED_SYSTEM_PROMPT in seen[0] and "Jawapan:" in seen[0]
    assert [x["parsed"] for x in r.records] == [[right[0], None], [wrong[1], right[1]], [None, None]]
    assert r.metrics["first_sample_acc"] == pytest.approx(1 / 3) and r.metrics["any_of_n_acc"] == pytest.approx(2 / 3)
    assert r.metrics["unparsed"] == 3 and r.metrics["unparsed_first"] == 1 and r.metrics["truncated"] == 1


def test_a_prompt_longer_than_the_context_is_counted_not_cut(gpt2):
    model = gpt2_model(gpt2, max_seq_len=64)
    short = MCQuestion(0, "anatomy", "", "What is 2 + 2?", ("3", "4", "5", "6"), 1)
    long = MCQuestion(1, "anatomy", "", "word " * 80 + "?", ("a", "b", "c", "d"), 0)
    result = tasks.mmlu(model, gpt2, [short, long])
    assert result.metrics["n"] == 1 and result.metrics["too_long"] == 1 and result.metrics["too_long_rows"] == [1]
    assert result.records[1]["skipped"].startswith("too_long") and "pred" not in result.records[1]
    assert result.metrics["acc"] == float(result.records[0]["correct"])
    gsm = tasks.gsm8k(model, gpt2, [GSMQuestion(0, "word " * 80, "so #### 4", "4")], max_new_tokens=4)
    assert gsm.metrics["n"] == 0 and gsm.metrics["too_long"] == 1 and gsm.metrics["strict_acc"] is None


def test_gsm8k_scores_completions_as_lm_eval_filters_do(gpt2, monkeypatch):
    questions = [GSMQuestion(0, "Q0", "r #### 1,200", "1,200"), GSMQuestion(1, "Q1", "r #### 7", "7"),
                 GSMQuestion(2, "Q2", "r #### 5", "5")]
    texts = {"Q0": ["so 1200 in all.\n#### 1,200", "#### 12"], "Q1": ["it is 8, then 7", "#### 7"],
             "Q2": ["I think 4 or 5", "six"]}
    cut = {"Q2"}  # hit max_new_tokens

    def fake(model, prompts, max_new_tokens, **kwargs):
        out = []
        for p in prompts:
            q = gpt2.decode(p).split("Question: ")[-1].split("\n")[0]
            i = sum(1 for o in out if o[0] == q)
            out.append((q, Completion(gpt2.encode(texts[q][i] + "\n\nQuestion: next"), q not in cut)))
        return [c for _, c in out]

    monkeypatch.setattr(tasks, "generate_completions", fake)
    r = tasks.gsm8k(gpt2_model(gpt2), gpt2, questions, samples=2, temperature=0.7)
    got = [(x["strict"], x["flexible"], x["strict_correct"], x["flexible_correct"]) for x in r.records]
    assert got == [("1,200", "1,200", True, True), (None, "7", False, True), (None, "5", False, True)]
    assert [x["completion"] for x in r.records][0] == "so 1200 in all.\n#### 1,200\n\n"  # cut before "Question:"
    assert r.metrics["strict_acc"] == pytest.approx(1 / 3) and r.metrics["flexible_acc"] == 1.0
    assert r.metrics["strict_pass@2"] == pytest.approx(2 / 3) and r.metrics["truncated"] == 1
    assert r.metrics["truncated_samples"] == 2
    with pytest.raises(ValueError, match="identical greedy answers"):
        tasks.gsm8k(gpt2_model(gpt2), gpt2, questions, samples=2)


def test_gsm8k_generates_with_the_kv_cache_and_counts_truncation(gpt2):
    model = gpt2_model(gpt2)
    questions = [GSMQuestion(i, f"What is {i} + {i}?", f"#### {2 * i}", str(2 * i)) for i in range(3)]
    r = tasks.gsm8k(model, gpt2, questions, max_new_tokens=5, batch_size=2)
    assert r.metrics["n"] == 3 and r.metrics["truncated"] == sum(x["truncated"] for x in r.records)
    for x in r.records:
        assert x["prompt"] == f"Question: {questions[x['row']].question}\nAnswer:"
        assert set(x) >= {"completion", "strict", "flexible", "strict_correct", "flexible_correct", "truncated"}


# ----------------------------------------------------------------------------- eval.py and train.py


@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gsm") / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"Sam has {i} apples and gets {i}. How many?",
                                        "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}) + "\n" for i in range(6)))
    return path


@pytest.fixture(scope="module")
def mmlu_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mmlu") / "mmlu.jsonl"
    path.write_text("".join(json.dumps({"subject": "high_school_mathematics", "question": f"What is {i} + 1?",
                                        "choices": [str(i), str(i + 1), str(i + 2), str(i + 3)], "answer": "B"}) + "\n"
                            for i in range(5)))
    return path


@pytest.fixture(scope="module")
def run_with_tasks(tmp_path_factory, gsm_file, mmlu_file) -> Path:
    out = tmp_path_factory.mktemp("tasks_run")
    train.main(["configs/debug.py", f"--out_dir={out}", "--max_steps=2", "--eval.interval=1", "--eval.batches=1",
                "--ckpt.interval=0", "--eval.tasks=gsm8k,mmlu", f"--eval.task.gsm8k_data={gsm_file}",
                f"--eval.task.mmlu_data={mmlu_file}", "--eval.task.limit=3", "--eval.task.max_new_tokens=6"])
    return out


def test_train_logs_eval_task_metrics(run_with_tasks):
    records = [json.loads(line) for line in (run_with_tasks / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert r["gsm8k_n"] == 3 and r["mmlu_n"] == 3 and 0 <= r["mmlu_acc"] <= 1
        assert {"gsm8k_strict_acc", "gsm8k_flexible_acc", "gsm8k_truncated"} <= set(r)


def test_train_refuses_a_task_file_it_cannot_read(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer mark", "answer": "42"}\n')
    with pytest.raises(SystemExit, match="####"):
        train.main(["configs/debug.py", f"--out_dir={tmp_path / 'run'}", "--max_steps=1", "--eval.tasks=gsm8k",
                    f"--eval.task.gsm8k_data={bad}"])


def test_eval_cli_runs_tasks_and_writes_records(run_with_tasks, gsm_file, mmlu_file, tmp_path, capsys):
    ckpt = str(checkpoint.resolve(run_with_tasks))
    out = tmp_path / "mmlu.jsonl"
    r = eval_script.main(["--ckpt", ckpt, "--task", "mmlu", "--data", str(mmlu_file), "--shots", "2", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(r)) and r["n"] == 5 and r["shots"] == 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5 and records[0]["prompt"].startswith("The following are multiple choice questions")
    with pytest.raises(SystemExit):  # --out never overwrites
        eval_script.main(["--ckpt", ckpt, "--task", "mmlu", "--data", str(mmlu_file), "--out", str(out)])
    assert "already exists" in capsys.readouterr().err
    r = eval_script.main(["--ckpt", ckpt, "--task", "gsm8k", "--data", str(gsm_file), "--limit", "2",
                          "--max_new_tokens", "4", "--out", str(tmp_path / "gsm.jsonl")])
    assert r["n"] == 2 and r["truncated"] <= 2 and r["strict_acc"] is not None
    records = [json.loads(line) for line in (tmp_path / "gsm.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "strict", "flexible", "strict_correct", "truncated"} <= set(records[0])


@pytest.mark.parametrize("flags, message", [
    (["--shots", "9"], "fewer than the 9 asked for"),  # more examples than the file has
    (["--shots", "-1"], "--shots must be >= 0"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--samples", "2"], "identical greedy answers"),
])
def test_eval_cli_bad_task_flags(run_with_tasks, mmlu_file, gsm_file, capsys, flags, message):
    ckpt = str(checkpoint.resolve(run_with_tasks))
    data = gsm_file if "--samples" in flags else mmlu_file
    task = "gsm8k" if "--samples" in flags else "mmlu"
    with pytest.raises(SystemExit) as e:
        eval_script.main(["--ckpt", ckpt, "--task", task, "--data", str(data), *flags])
    assert message in str(e.value) + capsys.readouterr().err


def test_eval_cli_empty_data_file_is_an_error(run_with_tasks, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="empty.jsonl"):
        eval_script.main(["--ckpt", str(checkpoint.resolve(run_with_tasks)), "--task", "mmlu", "--data", str(empty)])
