"""Build lc_reference.json: alpaca_eval's own length-controlled numbers on published judgments.

Not a test. Run once, in a throw-away virtualenv with `pip install alpaca-eval==0.6.6`, beside a clone
of github.com/tatsu-lab/alpaca_eval (its `results/` folder holds the GPT-4-Turbo judgments):

    python build_lc_reference.py /path/to/alpaca_eval

The official instruction difficulties are downloaded from a model hub at run time by the package;
a stand-in replaces them: the baseline's logit win rate per instruction against ten other models.
"""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import alpaca_eval.metrics.glm_winrate as glm
import numpy as np
import pandas as pd

MODELS = ["OpenHermes-2.5-Mistral-7B", "FuseChat-Gemma-2-9B-Instruct"]
OTHERS = [
    "alpaca-7b",
    "claude-2.1",
    "chatglm2-6b",
    "Qwen-14B-Chat",
    "baize-v2-13b",
    "claude-instant-1.2",
    "FuseChat-Llama-3.1-8B-Instruct",
    "FuseChat-Qwen-2.5-7B-Instruct",
    "alpaca-farm-ppo-human",
    "claude-2",
]
METRICS = ["win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error"]
METRICS += ["n_wins", "n_draws", "n_total", "discrete_win_rate"]


def annotations(repo: str, model: str) -> list[dict[str, str]]:
    path = f"HEAD:results/{model}/weighted_alpaca_eval_gpt4_turbo/annotations.json"
    raw = subprocess.run(["git", "-C", repo, "show", path], capture_output=True, check=True).stdout
    return list(json.loads(raw))


def main(repo: str) -> None:
    prefs = [[float(a["preference"]) - 1 for a in annotations(repo, other)] for other in OTHERS]
    mean = np.clip(np.mean(prefs, axis=0), 0.02, 0.98)
    # Harder instructions: the baseline wins them more often against other models.
    difficulty = np.round(-np.log(mean / (1 - mean)), 6)
    gamed = pd.DataFrame(
        {"index": range(len(difficulty)), "instruction_difficulty": difficulty, "model": "x"}
    )
    gamed.to_csv("df_gamed.csv", index=False)

    out: dict[str, object] = {"instruction_difficulty": difficulty.tolist(), "models": {}}
    for name in MODELS:
        rows = [
            {
                "preference": round(float(a["preference"]), 10),
                "len_reference": len(a["output_1"]),
                "len_model": len(a["output_2"]),
            }
            for a in annotations(repo, name)
        ]
        expected = {}
        for glm_name in ["length_controlled_noreg", "length_controlled_minimal"]:
            frame = pd.DataFrame(
                {
                    "preference": [r["preference"] for r in rows],
                    "output_1": ["x" * r["len_reference"] for r in rows],
                    "output_2": ["x" * r["len_model"] for r in rows],
                    "generator_1": "baseline",
                    "generator_2": name,
                    "annotator": "a",
                    "index": range(len(rows)),
                }
            )
            with mock.patch.object(glm, "hf_hub_download", return_value="df_gamed.csv"):
                metrics = glm.get_length_controlled_winrate(frame, glm_name=glm_name, save_weights_dir=None)
            expected[glm_name] = {key: float(metrics[key]) for key in METRICS}
        out["models"][name] = {"rows": rows, "expected": expected}  # type: ignore[index]
    Path("lc_reference.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
