"""Task accuracy in the loop (``cpt.eval.tasks``): task files checked before the first step, llm-foundry's ICL
evaluators scored at the run's cadence, and the logged accuracy equal to an independent computation: a plain
Hugging Face forward pass over the same examples with the same weights."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import prewarmed
import pytest
import torch

from cpt.data import synthetic
from cpt.io import storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yamls" / "tiny-cpu.yaml"
STEPS = 8


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _greedy_rows(model_dir: str, rows: list[dict], tok) -> list[dict]:
    """Half of a last-word task rewritten so that its continuation is the base model's own greedy next token:
    a task that the untrained model gets partly right, so agreement is not agreement on zeros."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for i, row in enumerate(rows):
        if i % 2 == 0:
            ids = tok(row["context"])["input_ids"]
            with torch.no_grad():
                ranked = model(torch.tensor([ids])).logits[0, -1].argsort(descending=True)
            s = tok.decode(ranked[:1].tolist())
            if s.startswith(" ") and s.strip() and tok(s)["input_ids"] == ranked[:1].tolist():
                row = {**row, "continuation": s}  # the greedy token, when it reads back as itself
        out.append(row)
    return out


@pytest.fixture(scope="module")
def task_run(tmp_path_factory, tiny_project, s3_server):
    """A tiny run with three tasks (two of them from S3), evaluated first, densely early, and at the end. The loss
    is the chunked one (as on a GPU): task scoring still sees the full logits."""
    import boto3
    from transformers import AutoTokenizer

    tmp = tiny_project(
        tmp_path_factory.mktemp("tasks"),
        {"upstream": {"Pile-CC": "prose"}, "downstream": {"Pile-CC": "science"}},
        {"train": 40, "val": 12},
    )
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="cpt-tasks")
    tok = AutoTokenizer.from_pretrained(str(tmp / "model"))
    texts = _texts(tmp / "upstream-val.jsonl") + _texts(tmp / "downstream-val.jsonl")
    rows = {
        "lastword": _greedy_rows(str(tmp / "model"), synthetic.last_word(texts, 24, seed=1), tok),
        "nextword": synthetic.next_word_choice(texts, 30, seed=2),
        "schema": [
            {"context_options": [" ".join(r["query"].split()[:12]), "numbers and symbols only"], "gold": i % 2,
             "continuation": r["choices"][r["gold"]]}
            for i, r in enumerate(synthetic.next_word_choice(texts, 16, seed=3))
        ],
    }  # fmt: skip
    paths = {}
    for name, r in rows.items():
        local = synthetic.write_task(tmp / f"{name}.jsonl", r)
        paths[name] = local if name == "schema" else f"s3://cpt-tasks/{name}.jsonl"
        if name != "schema":
            storage.upload_file(local, paths[name])
    tasks = (
        f"cpt.eval.tasks={{lastword: {{path: '{paths['lastword']}', kind: language_modeling}}, "
        f"nextword: {{path: '{paths['nextword']}', kind: multiple_choice, examples: 20}}, "
        f"schema: {{path: '{paths['schema']}', kind: schema}}}}"
    )
    env = {**os.environ, "CPT_CACHE": str(tmp / "cache"), "S3_ENDPOINT_URL": s3_server, "WANDB_SILENT": "true"}
    env["WANDB_MODE"] = "offline"  # W&B's run file, written locally
    code, log = prewarmed.run(
        ["-m", "cpt.cli", "train", str(TINY), f"variables.data={tmp / 'data'}",
         f"variables.model={tmp / 'model'}", f"variables.save_folder={tmp / 'ck'}", f"cpt.run_dir={tmp / 'runs'}",
         "variables.run_name=tasks", f"max_duration={STEPS}ba", "save_interval=4ba", "cpt.eval.interval=4ba",
         "cpt.eval.tokens_per_domain=512", "cpt.num_workers=0", tasks, "cpt.loss.impl=chunked",
         "cpt.eval.datasets.upstream.blends.mix={Pile-CC: 1}", f"variables.hf_token={SECRETS[0]}",
         f"variables.mlflow_tracking_token={SECRETS[1]}", f"variables.wandb_passphrase={SECRETS[2]}",
         f"loggers={{mlflow: {{tracking_uri: 'file:{tmp}/mlruns', experiment_name: cpt-tasks}}, "
         f"tensorboard: {{log_dir: '{tmp}/tb'}}, "
         f"wandb: {{project: cpt-tasks, init_kwargs: {{mode: offline, dir: '{tmp}/wandb'}}}}}}"],
        cwd=str(tmp), env=env, timeout=600,
    )  # fmt: skip
    assert code == 0, log[-5000:]
    metrics = [json.loads(line) for line in (tmp / "runs" / "tasks" / "metrics.jsonl").read_text().splitlines()]
    (tmp / "tasks.yaml").write_text(tasks.replace("cpt.eval.tasks=", "tasks: ") + "\n")  # for cpt eval
    return {"tmp": tmp, "rows": rows, "metrics": metrics, "log": log, "tok": tok}


SECRETS = ("hf_NotARealTokenButLongEnough1234", "mlflow-tracking-secret-987", "open-sesame-passphrase-42")

KEYS = {
    "lastword": "metrics/tasks/lastword/0-shot/InContextLearningLMAccuracy",
    "nextword": "metrics/tasks/nextword/0-shot/InContextLearningMultipleChoiceAccuracy",
    "schema": "metrics/tasks/schema/0-shot/InContextLearningMultipleChoiceAccuracy",
}


def _logged(metrics: list[dict], key: str) -> dict[int, float]:
    return {r["batch"]: r[key] for r in metrics if key in r}


def _mean_ce(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1 : -1]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(continuation)))


def independent_accuracy(model, tok, kind: str, rows: list[dict]) -> float:
    """Accuracy by hand, in llm-foundry's convention: the context without trailing space, the continuation with
    its leading space; a choice wins by the lowest mean cross-entropy per token of its continuation."""

    def enc(s: str) -> list[int]:
        return tok(s)["input_ids"]

    correct = 0
    for row in rows:
        if kind == "language_modeling":
            ctx, cont = enc(row["context"].rstrip()), enc(row["continuation"])
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1]
            correct += logits.argmax(-1).tolist() == cont
        elif kind == "multiple_choice":
            ces = [_mean_ce(model, enc(row["query"].rstrip()), enc(" " + c)) for c in row["choices"]]
            correct += ces.index(min(ces)) == row["gold"]
        else:
            ces = [_mean_ce(model, enc(c.rstrip()), enc(" " + row["continuation"])) for c in row["context_options"]]
            correct += ces.index(min(ces)) == row["gold"]
    return correct / len(rows)


def _model(task_run, batch: int):
    from transformers import GPTNeoXForCausalLM

    tmp = task_run["tmp"]
    model = GPTNeoXForCausalLM.from_pretrained(str(tmp / "model"))
    if batch:
        state = torch.load(tmp / "ck" / f"ep0-ba{batch}-rank0.pt", map_location="cpu", weights_only=False)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state["state"]["model"].items()})
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("batch", [0, STEPS])
def test_logged_accuracy_equals_a_plain_forward_pass(task_run, batch):
    model, tok = _model(task_run, batch), task_run["tok"]
    kinds = {"lastword": "language_modeling", "nextword": "multiple_choice", "schema": "schema"}
    for name, key in KEYS.items():
        rows = task_run["rows"][name][:20] if name == "nextword" else task_run["rows"][name]  # examples: 20
        expected = independent_accuracy(model, tok, kinds[name], rows)
        assert _logged(task_run["metrics"], key)[batch] == pytest.approx(expected, abs=1e-6), (name, batch)
    if batch == 0:  # the greedy rows of the last-word task are right, by construction
        assert _logged(task_run["metrics"], KEYS["lastword"])[0] > 0


@pytest.mark.slow
def test_tasks_follow_the_perplexity_cadence_and_the_run_is_quiet(task_run):
    ppl = _logged(task_run["metrics"], "metrics/eval/upstream/all/LanguageCrossEntropy")
    # first, early every batch to 0.125dur (batch 1), the warmup's peak (batch 1), every 4 (and the end)
    assert sorted(ppl) == [0, 1, 4, 8]
    for key in KEYS.values():
        assert sorted(_logged(task_run["metrics"], key)) == sorted(ppl)
    log = task_run["log"]
    assert "was called before the update method" not in log
    assert "worker processes in total" not in log  # torch's warning about more loader workers than CPUs
    assert "downloaded s3://cpt-tasks/lastword.jsonl into" in log  # S3: fetched into the cache
    assert re.search(r"evaluation took [\d.]+ s of the [\d.]+ s since the trainer started: tasks [\d.]+ s", log)
    assert "changing autoresume default" not in log  # llm-foundry's notice of a default cpt does not use
    assert not list(task_run["tmp"].glob("*-0.jsonl"))  # llm-foundry copied nothing into the working directory


@pytest.mark.parametrize(
    "line,why",
    [
        ("not json", "not valid JSON"),
        ('{"query": "a", "choices": ["b", "c"]}', "missing 'gold'"),
        ('{"query": "a", "choices": ["b", "c"], "gold": 2}', "gold=2 is not an index of its 2 options"),
        ('{"query": "a", "choices": ["b"], "gold": 0}', "at least two"),
        ('{"query": "a", "choices": "bc", "gold": 0}', "'choices' must be a list"),
        ('{"query": "", "choices": ["b", "c"], "gold": 0}', "an empty query"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_a_malformed_task_file_fails_before_the_first_step_naming_file_and_line(tiny, tmp_path, line, why):
    from conftest import load_tiny

    from cpt.config import ConfigError
    from cpt.run.plan import Plan

    good = '{"query": "the river", "choices": [" city", " gene"], "gold": 0}'
    path = tmp_path / "mc.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n")
    cfg = load_tiny(tiny, f"cpt.eval.tasks={{mc: {{path: '{path}', kind: multiple_choice}}}}")
    with pytest.raises(ConfigError, match=rf"cpt.eval.tasks.mc.path: {path}:3: .*{why}"):
        Plan.from_config(cfg, "tiny.yaml")


def test_task_settings_are_checked(tiny, tmp_path, s3_bucket):
    from conftest import load_tiny

    from cpt.config import ConfigError, check
    from cpt.run.plan import Plan

    path = synthetic.write_task(tmp_path / "lm.jsonl", [{"context": "a b", "continuation": " c"}] * 3)
    for task, why in (
        ("{path: P, kind: cloze}", "kind='cloze' must be one of language_modeling, multiple_choice, schema"),
        ("{path: P, kind: schema, fewshot: -1}", "fewshot=-1 must be at least 0"),
        ("{path: P, kind: schema, examples: 0}", "examples=0 must be at least 1"),
        ("{path: P, kind: schema, shots: 1}", "unknown key cpt.eval.tasks.t.shots"),
        ("{path: 's3:/b/x.jsonl', kind: schema}", "s3:/b"),
    ):
        with pytest.raises(ConfigError, match=why):
            check(load_tiny(tiny, f"cpt.eval.tasks={{t: {task.replace('P', str(path))}}}"))
    with pytest.raises(ConfigError, match=r"fewshot=3 needs more than 3 examples; it holds 3"):
        Plan.from_config(
            load_tiny(tiny, f"cpt.eval.tasks={{t: {{path: '{path}', kind: language_modeling, fewshot: 3}}}}")
        )
    with pytest.raises(ConfigError, match=r"cpt.eval.tasks.t.path: .*no such file"):
        Plan.from_config(load_tiny(tiny, f"cpt.eval.tasks={{t: {{path: '{tmp_path}/nope.jsonl', kind: schema}}}}"))
    with pytest.raises(ConfigError, match=rf"cpt.eval.tasks.t.path: .*{s3_bucket}/missing.jsonl"):
        Plan.from_config(load_tiny(tiny, f"cpt.eval.tasks={{t: {{path: '{s3_bucket}/missing.jsonl', kind: schema}}}}"))
    with pytest.raises(ConfigError, match=r"warmup_interval is gone.*cpt.eval.early"):
        check(load_tiny(tiny, "cpt.eval.warmup_interval=1ba"))


def test_budget_in_batches_per_task():
    """``examples`` -> enough batches of the task's own loader (its batch counts questions, not rows)."""
    from types import SimpleNamespace

    from cpt.eval.domains import EvalCadence

    def evaluator(label, batch_size):
        loader = SimpleNamespace(dataloader=SimpleNamespace(batch_size=batch_size))
        return SimpleNamespace(label=label, dataloader=loader, subset_num_batches=None, eval_interval=None)

    evs = [evaluator("tasks/a/0-shot", 4), evaluator("tasks/b/0-shot", 4), evaluator("eval/up/prose", 8)]
    cadence = EvalCadence(interval=10, subset_num_batches=3, task_examples={"tasks/a/0-shot": 21})
    cadence.after_load(SimpleNamespace(evaluators=evs), None)
    assert [e.subset_num_batches for e in evs] == [math.ceil(21 / 4), None, 3]  # b: all of its examples
    assert [e.eval_interval for e in evs] == [cadence.for_tasks, cadence.for_tasks, cadence]  # tasks: every Nth


def _sum_rule(model, tok, rows: list[dict]) -> float:
    """lm-eval's ``acc`` for multiple choice, by hand: the highest summed log-likelihood of the choice."""
    correct = 0
    for row in rows:
        ctx = tok(row["query"])["input_ids"]
        sums = [
            -_mean_ce(model, ctx, tok(" " + c)["input_ids"]) * len(tok(" " + c)["input_ids"]) for c in row["choices"]
        ]
        correct += sums.index(max(sums)) == row["gold"]
    return correct / len(rows)


@pytest.mark.slow
def test_cpt_eval_offline_agrees_with_the_loop(task_run):
    """``cpt eval`` (lm-eval) on the base folder and on the run's save folder (each checkpoint exported on the fly):
    the same accuracy as the loop for the last-word and schema tasks; for multiple choice, lm-eval's ``acc`` is the
    summed log-likelihood rule, equal to the loop's mean rule where a question's choices have one length."""
    from cpt.cli import main

    tmp, tok = task_run["tmp"], task_run["tok"]
    results = {}
    for name, model_spec in (("base", tmp / "model"), ("run", tmp / "ck")):
        out = tmp / f"eval-{name}"
        argv = ["eval", str(model_spec), str(tmp / "tasks.yaml"), "--out", str(out), "--budget", "--log-samples"]
        assert main([*argv, "--device", "cpu"]) == 0
        results.update(
            {r["batch"] or 0: r["tasks"] for r in json.loads((out / "eval.json").read_text())["results"].values()}
        )
        assert (out / "eval.md").is_file()
    assert sorted(results) == [0, 4, 8] and (tmp / "eval-run" / "eval.png").is_file()  # a curve: every checkpoint
    for batch, scores in results.items():
        loop = {name: _logged(task_run["metrics"], key)[batch] for name, key in KEYS.items()}
        assert scores["lastword"]["acc"] == pytest.approx(loop["lastword"], abs=1e-6), batch
        assert scores["schema"]["acc"] == pytest.approx(loop["schema"], abs=1e-6), batch
        rows = task_run["rows"]["nextword"][:20]
        assert scores["nextword"]["acc"] == pytest.approx(_sum_rule(_model(task_run, batch), tok, rows), abs=1e-6)
        one_length = all(len({len(tok(" " + c)["input_ids"]) for c in r["choices"]}) == 1 for r in rows)
        if one_length:
            assert scores["nextword"]["acc"] == pytest.approx(loop["nextword"], abs=1e-6)
        # the loop's rule, computed by cpt eval from lm-eval's log-likelihoods: the loop's own numbers
        assert scores["nextword"]["acc_loop"] == pytest.approx(loop["nextword"], abs=1e-6), batch
        assert scores["schema"]["acc_loop"] == pytest.approx(loop["schema"], abs=1e-6), batch
    picks = [json.loads(line) for line in (tmp / "eval-run" / "samples-nextword.jsonl").read_text().splitlines()]
    assert len(picks) == 2 * 20 and {"loglikelihoods", "tokens", "acc_pick", "loop_pick"} <= set(picks[0])


HUB_ROWS = {  # one or two rows per dataset, as the hub serves them (field names and types)
    "hellaswag": [
        {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow on the window.",
         "ctx_b": "then", "endings": [", the man adds wax.", ", a person boards a lift.", ", the man sings.",
         ", the man keeps removing the snow."], "label": "3"},
        {"activity_label": "Cooking", "ctx_a": "[header] How to cook rice. [title] Rinse the rice.", "ctx_b": "soak",
         "endings": ["it.", "the pot.", "a towel.", "nothing."], "label": "0"},
    ],
    "arc_easy": [{"question": "Which gas do plants absorb?", "answerKey": "B",
                  "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}}],
    "arc_challenge": [{"question": "What melts ice fastest?", "answerKey": "3",
                       "choices": {"text": ["sand", "water", "salt", "air"], "label": ["1", "2", "3", "4"]}}],
    "winogrande": [{"sentence": "The trophy does not fit into the suitcase because _ is too large.",
                    "option1": "the trophy", "option2": "the suitcase", "answer": "1"}],
    "piqa": [{"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "hit it with a spoon.", "label": 0}],
    "openbookqa": [{"question_stem": "The sun is", "answerKey": "D ",
                    "choices": {"text": ["cold", "small", "a planet", "a star"], "label": ["A", "B", "C", "D"]}}],
    "lambada_openai": [{"text": "he opened the door and saw his old friend standing there"}],
}  # fmt: skip


def write_hub_rows(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in HUB_ROWS.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_standard_tasks_convert_as_lm_eval_prompts_them(tmp_path, s3_bucket):
    """``convert/tasks.py --source``: each dataset's rows -> cpt's format, the prompts written by hand after
    lm-evaluation-harness's task definitions; written to S3 and readable by the loop's checks."""
    script = ROOT / "convert" / "tasks.py"
    src = write_hub_rows(tmp_path / "hub")
    proc = subprocess.run([sys.executable, str(script), "--source", str(src), "--out", f"{s3_bucket}/tasks"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    def read(name):
        return [
            json.loads(line) for line in storage.read_bytes(f"{s3_bucket}/tasks/{name}.jsonl").decode().splitlines()
        ]

    assert read("hellaswag") == [
        {"query": "Removing ice from car: Then, the man writes over the snow on the window. Then",
         "choices": [", the man adds wax.", ", a person boards a lift.", ", the man sings.",
                     ", the man keeps removing the snow."], "gold": 3},
        {"query": "Cooking: How to cook rice.. Rinse the rice. Soak",
         "choices": ["it.", "the pot.", "a towel.", "nothing."], "gold": 0},
    ]  # fmt: skip
    assert read("arc_easy") == [{"query": "Question: Which gas do plants absorb?\nAnswer:",
                                 "choices": ["oxygen", "carbon dioxide", "helium", "neon"], "gold": 1}]  # fmt: skip
    assert read("arc_challenge")[0]["gold"] == 2
    because = "The trophy does not fit into the suitcase because"
    assert read("winogrande") == [{"context_options": [f"{because} the trophy", f"{because} the suitcase"],
                                   "continuation": "is too large.", "gold": 0}]  # fmt: skip
    assert read("piqa") == [{"query": "Question: To open a jar,\nAnswer:",
                             "choices": ["twist the lid.", "hit it with a spoon."], "gold": 0}]  # fmt: skip
    assert read("openbookqa")[0] == {
        "query": "The sun is",
        "choices": ["cold", "small", "a planet", "a star"],
        "gold": 3,
    }
    assert read("lambada_openai") == [{"context": "he opened the door and saw his old friend standing",
                                       "continuation": " there"}]  # fmt: skip
    (src / "piqa.jsonl").write_text('{"goal": "x", "sol1": "a"}\n')
    proc = subprocess.run([sys.executable, str(script), "--source", str(src), "--out", str(tmp_path / "o"),
                           "--tasks", "piqa"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "piqa: row 0: cannot convert (KeyError('sol2'))" in proc.stderr


LOGGED = [
    *KEYS.values(),
    "metrics/eval/upstream/all/LanguageCrossEntropy",
    "metrics/eval/upstream/mix/LanguageCrossEntropy",
    "metrics/eval/downstream/pile-cc/LanguagePerplexity",
]


def wandb_history(root: Path) -> dict[str, dict[int, float]]:
    """Every logged value of an offline W&B run (``<dir>/wandb/offline-run-*/run-*.wandb``), by key and step,
    read from the run file's records with W&B's own reader."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    (path,) = root.rglob("offline-run-*/run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    out: dict[str, dict[int, float]] = {}
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        step = items.pop("_step", None)
        for key, value in items.items():
            if isinstance(value, int | float) and not key.startswith("_"):
                out.setdefault(key, {})[int(step)] = float(value)
    return out


@pytest.mark.slow
def test_mlflow_tensorboard_and_wandb_receive_domains_blends_tasks_and_lr(task_run):
    """The YAML's ``loggers:`` (MLflow's local file store, TensorBoard, W&B offline), read back from their stores:
    every evaluation's per-domain metric, blend and task accuracy, and every batch's LR, equal to
    ``metrics.jsonl``'s. (MFU is logged on GPUs only: Composer's speed monitor needs their peak FLOP/s.)"""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp = task_run["tmp"]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{tmp}/mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("cpt-tasks").experiment_id])
    tb = []  # Composer writes <log_dir>/<run>/ (and a folder below it for the hyperparameters)
    for folder in sorted({p.parent for p in (tmp / "tb").rglob("events.out.tfevents.*")}):
        tb.append(EventAccumulator(str(folder), size_guidance={"scalars": 0}))
        tb[-1].Reload()
    wandb = wandb_history(tmp / "wandb")
    for key in LOGGED:
        expected = _logged(task_run["metrics"], key)
        assert len(expected) == 4, key
        mlflow_points = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert mlflow_points == pytest.approx(expected, rel=1e-6), key
        tb_points = {e.step: e.value for acc in tb if key in acc.Tags()["scalars"] for e in acc.Scalars(key)}
        assert tb_points == pytest.approx(expected, rel=1e-6), key
        assert wandb[key] == pytest.approx(expected, rel=1e-6), key
    (lr_key,) = {k for r in task_run["metrics"] for k in r if k.startswith("lr-")}
    lrs = _logged(task_run["metrics"], lr_key)
    assert len(lrs) == STEPS + 1 and wandb[lr_key] == pytest.approx(lrs, rel=1e-6)  # batch 0's included
    # the secrets given on the command line reach no store: MLflow's params, TensorBoard, the log, the bucket's record
    params = json.dumps(client.get_run(run.info.run_id).data.params)
    assert "hf_token" in params  # the key is logged, masked
    stores = [params, task_run["log"], (tmp / "ck" / "cpt-run.json").read_text()]
    stores += [p.read_bytes().decode("latin-1") for p in [*(tmp / "tb").rglob("*"), *(tmp / "mlruns").rglob("*"),
               *(tmp / "wandb").rglob("*")] if p.is_file()]  # fmt: skip
    for secret in SECRETS:
        assert not [i for i, text in enumerate(stores) if secret in text], secret


def test_an_s3_task_file_is_fetched_once_and_again_when_it_changes(s3_bucket, tmp_path, caplog):
    import logging

    from cpt.eval.tasks import prepare
    from cpt.spec import Task

    rows = [{"context": "the river", "continuation": " city"}, {"context": "a cell", "continuation": " gene"}]
    url = f"{s3_bucket}/tasks/lm.jsonl"
    storage.upload_file(synthetic.write_task(tmp_path / "lm.jsonl", rows), url)
    tasks = {"lm": Task(path=url, kind="language_modeling")}
    with caplog.at_level(logging.INFO, logger="cpt"):
        first = prepare(tasks)["lm"]
        assert prepare(tasks)["lm"] == first  # a relaunch, or another rank on the node
        storage.write_bytes(url, (json.dumps(rows[0]) + "\n").encode())  # replaced in the bucket
        assert prepare(tasks)["lm"] == first
    said = [r.getMessage() for r in caplog.records]
    assert [m.split(" ")[0] for m in said if url in m] == [
        "downloaded",
        "using",
        s3_bucket + "/tasks/lm.jsonl",
        "downloaded",
    ]
    assert Path(first).read_text() == json.dumps(rows[0]) + "\n"


def test_examples_longer_than_the_sequence_are_counted_per_task(tiny, tmp_path, caplog):
    import logging

    from conftest import load_tiny

    from cpt.run.plan import Plan

    short = {"context": "the river", "continuation": " city"}
    long = {"context": " ".join(["word"] * 80), "continuation": " end"}  # 80 words: over tiny-cpu's 64 tokens
    path = synthetic.write_task(tmp_path / "lm.jsonl", [short, long, short])
    task = f"cpt.eval.tasks={{lm: {{path: '{path}', kind: language_modeling}}}}"
    with caplog.at_level(logging.WARNING, logger="cpt"):
        Plan.from_config(load_tiny(tiny, task), "tiny")
    assert "cpt.eval.tasks.lm: 1 of 3 examples are longer than max_seq_len=64 tokens" in caplog.text


@pytest.mark.parametrize(
    "longest, fewshot, seq_len, expected",
    [
        ({"a": 40, "b": 100}, 0, 2048, 128),  # 100 + 8, rounded up to 64s
        ({"a": 56}, 0, 2048, 64),  # 56 + 8 = 64 exactly
        ({"a": 57}, 0, 2048, 128),
        ({"a": 2000}, 0, 2048, 2048),  # never above max_seq_len
        ({"a": 40}, 1, 2048, 2048),  # few-shot prompts are not measured: the full length
        ({}, 0, 2048, 2048),
    ],
)
def test_task_examples_are_padded_to_the_longest_not_the_sequence(longest, fewshot, seq_len, expected):
    from cpt.eval.tasks import padded_length
    from cpt.spec import Task

    tasks = {name: Task(path="x.jsonl", kind="multiple_choice", fewshot=fewshot) for name in longest or {"a": 0}}
    assert padded_length(tasks, longest, seq_len) == expected
