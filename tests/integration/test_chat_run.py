"""A federated run on chat data (`data.format: messages`) with a chat template on the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fedtune

# Each turn is "<first letter of the role, upper case>:" + content + EOS; the cue is "A:".
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'][0] | upper }}:{{ m['content'] }}"
            "</s>{% endfor %}{% if add_generation_prompt %}A:{% endif %}")


def test_run_on_messages_with_a_chat_template(tiny_model_dir, tiny_recipe, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    rows = []
    for i in range(24):
        turns = [{"role": "user", "content": f"say {i % 4}"}, {"role": "assistant", "content": f"{i % 4}"}]
        if i % 2:
            turns = [{"role": "system", "content": "short"}, *turns,
                     {"role": "user", "content": "again"}, {"role": "assistant", "content": f"{i % 4}"}]
        rows.append({"messages": turns, "kind": ["a", "b", "c"][i % 3]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(model__name=str(model_dir), federation__rounds=1, output__name="chat")
    recipe["data"] = {"source": str(data), "max_length": 64, "test_fraction": 0.25,
                      "val_fraction": 0.0, "split": {"method": "meta", "by": "kind"}}
    summary = fedtune.run(recipe)
    assert summary["final"]["loss"] < summary["initial"]["loss"]
    assert "exact_match" in summary["final"]
    split = json.loads((Path(recipe["output"]["dir"]) / "chat" / "split.json").read_text())
    assert split["totals"]["n_train"] + split["totals"]["n_test"] == 24
