"""The Prefect UI path, driven as a person would in headless Chromium.

A real server and process worker on loopback (via scripts/), the train-gear
deployment of prefect.yaml, then in the browser: Deployments > train >
Run > Custom run, change "Max Steps" in the form, submit, open the run and
wait for Completed; the run's Parameters tab, the API and the trained model's
summary all show the changed value. Screenshots go to
test-output/browser/ (failure.png on failure; form.png and completed.png always).

Needs Debian's Chromium (apt-get install -y chromium) and the Python
`playwright` package (pip install -e '.[browser]'); no browser download.
Run alone: .venv/bin/pytest -m browser tests/test_ui_browser.py
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from flows.profiles import overrides
from tasks.common import mark_complete, write_parquet
from ui.browser import browser_skip_mark, chromium_page, run_parameters_text, start_custom_run, wait_for_final_state
from ui.stack import PrefectStack, output_dir_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1200)]

if (_skip := browser_skip_mark()) is not None:
    pytestmark.append(_skip)

SPAN = pa.struct([("start", pa.int32()), ("end", pa.int32())])
TRIPLES_SCHEMA = pa.schema(
    [
        ("query", pa.string()), ("doc_id", pa.string()), ("title", pa.string()), ("document", pa.string()),
        ("unit", pa.string()), ("unit_index", pa.int32()), ("unit_start", pa.int32()), ("unit_end", pa.int32()),
        ("sentence_spans", pa.list_(SPAN)), ("score", pa.float32()), ("rewriter_model", pa.string()),
        ("prompt_version", pa.string()), ("dump_name", pa.string()), ("split", pa.string()),
    ]
)
DOCS = {
    "alps": ["The Alps are a mountain range in Europe.", "Mont Blanc is their highest peak.", "Glaciers cover parts of it."],
    "nile": ["The Nile flows north through Egypt.", "It is about 6650 kilometres long.", "Cities grew along its banks."],
    "jazz": ["Jazz began in New Orleans.", "Louis Armstrong played the trumpet.", "Bebop appeared in the 1940s."],
    "moon": ["The Moon orbits the Earth.", "Apollo 11 landed there in 1969.", "Its surface is full of craters."],
}
QUERIES = {"alps": ["highest peak Mont Blanc", "glaciers range"], "nile": ["Nile length kilometres", "cities banks Nile"],
           "jazz": ["Louis Armstrong trumpet", "bebop 1940s"], "moon": ["Apollo 11 landing", "moon craters"]}

DEFAULT_STEPS = 1  # the deployment's value
FORM_STEPS = 3  # what the test types into the form


def write_tiny_dataset(root: Path) -> Path:
    """A dataset version folder of 8 training triples in the triples schema."""
    rows = []
    for doc_id, sentences in DOCS.items():
        text = " ".join(sentences)
        spans, pos = [], 0
        for s in sentences:
            spans.append((pos, pos + len(s)))
            pos += len(s) + 1
        for i, query in enumerate(QUERIES[doc_id]):
            start, end = spans[i + 1]
            rows.append({"query": query, "doc_id": doc_id, "title": doc_id.title(), "document": text,
                         "unit": text[start:end], "unit_index": i + 1, "unit_start": start, "unit_end": end,
                         "sentence_spans": [{"start": s, "end": e} for s, e in spans], "score": 0.9,
                         "rewriter_model": "fixture", "prompt_version": "v0", "dump_name": "fixture", "split": "train"})
    version = root / "datasets" / "v-fixture"
    write_parquet(pa.Table.from_pylist(rows, schema=TRIPLES_SCHEMA), version / "train.parquet", TRIPLES_SCHEMA)
    write_parquet(pa.Table.from_pylist(rows[:2], schema=TRIPLES_SCHEMA), version / "test.parquet", TRIPLES_SCHEMA)
    mark_complete(version, {"fixture": True})
    (root / "datasets" / "LATEST").write_text("v-fixture\n")
    return version


def write_tiny_bert(folder: Path) -> Path:
    """A random-init 2-layer BERT with the real (bert-base-uncased) tokenizer: trains in seconds."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tasks.assets import embedded_encoder_path

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(embedded_encoder_path())).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = PrefectStack(tmp_path_factory.mktemp("prefect-ui") / "home")
    try:
        s.start_server()
        s.deploy("train-gear/train")
        s.start_worker("gear-local")
        yield s
    except BaseException:
        print(s.log_tails(200))
        raise
    finally:
        s.stop()
        print("prefect stack timings:", json.dumps(s.timings))


def test_custom_training_run_from_the_ui(stack, tmp_path):
    out = output_dir_for("browser")
    data = tmp_path / "data"
    write_tiny_dataset(data)
    bert = write_tiny_bert(tmp_path / "tiny-bert")
    # The operator's deployment defaults for this machine (what `prefect deploy
    # --param` or the deployment's edit page would set): tiny, quick training.
    base = {**overrides("demo", "train-gear"), "dataset": str(data / "datasets"), "output_dir": str(data),
            "init_checkpoint": str(bert), "epochs": 2, "batch_size": 2, "queue_size": 8, "max_query_length": 16,
            "max_doc_length": 64, "max_unit_length": 16, "max_steps": DEFAULT_STEPS, "device": "cpu"}
    dep = stack.deployment("train-gear/train")
    stack.client.patch(f"/deployments/{dep['id']}", json={"parameters": {"params": base}}).raise_for_status()

    run_name = f"ui-custom-{uuid.uuid4().hex[:8]}"
    with stack.diagnostics(out), chromium_page(out) as page:
        # Fill the form, screenshot it, submit.
        def before_submit(p):
            p.screenshot(path=str(out / "form.png"), full_page=True)

        run_id = start_custom_run(page, stack.url, "train", "train-gear", run_name, {"Max Steps": str(FORM_STEPS)},
                                  before_submit=before_submit)
        state = wait_for_final_state(page, timeout_s=600)
        page.screenshot(path=str(out / "completed.png"), full_page=True)
        if state != "Completed":
            raise AssertionError(f"run {run_name} ended {state}\n{stack.run_logs(run_id)}")
        shown = json.loads(run_parameters_text(page))
        page.screenshot(path=str(out / "parameters.png"), full_page=True)

    # The page, the API and the trained model agree on the changed value.
    assert shown["params"]["max_steps"] == FORM_STEPS
    run = stack.flow_run(run_id)
    assert run["name"] == run_name and run["state"]["type"] == "COMPLETED"
    assert run["parameters"]["params"]["max_steps"] == FORM_STEPS
    assert run["parameters"]["params"]["dataset"] == base["dataset"]  # the rest came from the deployment
    latest = (data / "models" / "LATEST").read_text().strip()
    summary = json.loads((data / "models" / Path(latest).parent / "summary.json").read_text())
    assert summary["steps"] == FORM_STEPS
    # The loss curve and training report are on the run's page as artifacts.
    assert stack.artifacts(run_id), "train-gear published no artifacts"
