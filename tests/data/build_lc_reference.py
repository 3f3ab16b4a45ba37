"""Build lc_reference.json: alpaca_eval's own length-controlled numbers on published judgments.

Not a test. Run once, where `pip install alpaca-eval==0.6.6` is installed (the dev extra), beside a
clone of github.com/tatsu-lab/alpaca_eval (its `results/` folder holds the GPT-4-Turbo judgments):

    python build_lc_reference.py /path/to/alpaca_eval

Source: `results/<model>/weighted_alpaca_eval_gpt4_turbo/annotations.json` of that repository, at the
commit recorded in the fixture (cd543a1 for the checked-in one; built with alpaca-eval 0.6.6,
scikit-learn 1.9.1, pandas 3.1.1, numpy 2.3.5). Only the columns the GLM reads are kept: the preference,
the model's output length, and the baseline's (gpt4_1106_preview, the same 805 outputs for every model).

The official instruction difficulties are downloaded from a model hub at run time by the package;
a stand-in replaces them: the baseline's logit win rate per instruction against ten other models.
"""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import alpaca_eval.metrics.glm_winrate as glm
import numpy as np
import pandas as pd

# Outputs from 69 to 2,259 characters on average; the first two were the fixture's first models, the
# others are where a fixed weak L2 fit missed the package's cross-validated L1 fit by 0.07 to 3.3 points.
MODELS = [
    "gpt4_gamed",
    "text_davinci_003",
    "alpaca-7b",
    "gpt4_0613_concise",
    "gpt-3.5-turbo-1106",
    "OpenHermes-2.5-Mistral-7B",
    "FuseChat-Gemma-2-9B-Instruct",
    "FuseChat-Llama-3.2-1B-Instruct",
]
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
PATH = "results/{model}/weighted_alpaca_eval_gpt4_turbo/annotations.json"


def annotations(repo: str, model: str) -> list[dict[str, str]]:
    path = "HEAD:" + PATH.format(model=model)
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

    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    packages = ["alpaca-eval", "scikit-learn", "pandas", "numpy"]
    out: dict[str, object] = {
        "source": {"repository": "github.com/tatsu-lab/alpaca_eval", "commit": commit.strip(), "path": PATH},
        "built_with": {name: version(name) for name in packages},
        "instruction_difficulty": difficulty.tolist(),
    }
    models: dict[str, object] = {}
    for name in MODELS:
        judged = annotations(repo, name)
        reference_lengths = [len(a["output_1"]) for a in judged]
        out.setdefault("len_reference", reference_lengths)
        assert out["len_reference"] == reference_lengths, "every model is judged against the same outputs"
        preferences = [round(float(a["preference"]), 10) for a in judged]
        model_lengths = [len(a["output_2"]) for a in judged]
        expected = {}
        for glm_name in ["length_controlled_noreg", "length_controlled_minimal"]:
            frame = pd.DataFrame(
                {
                    "preference": preferences,
                    "output_1": ["x" * n for n in reference_lengths],
                    "output_2": ["x" * n for n in model_lengths],
                    "generator_1": "baseline",
                    "generator_2": name,
                    "annotator": "a",
                    "index": range(len(judged)),
                }
            )
            with mock.patch.object(glm, "hf_hub_download", return_value="df_gamed.csv"):
                metrics = glm.get_length_controlled_winrate(frame, glm_name=glm_name, save_weights_dir=None)
            expected[glm_name] = {key: float(metrics[key]) for key in METRICS}
        models[name] = {"preference": preferences, "len_model": model_lengths, "expected": expected}
    out["models"] = models
    Path("lc_reference.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
