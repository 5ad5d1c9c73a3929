"""Sampler settings against class accuracy and FID, on one finished small-data run (no training).

Each line of `--calls` (a JSON list of pipeline call arguments; the scheduler may be swapped with
`{"scheduler": "heun"}` and the sampling shift with `{"shift": 2.0}`) is scored like `bench/small_data.py`: class
accuracy by the data set's judge and FID against held-out images, on the same N class-balanced samples with the same
seed. Rows are appended to `--out` (JSON lines).

    python bench/small_data_sampling.py outputs/small-data/gray28-recipe --data outputs/glyphs/gray28 \
        --calls '[{}, {"guidance_scale": 2}, {"guidance_interval": [0.2, 0.8]}]'
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from small_data import RESULTS, VARIANTS, Scorer, prepare  # noqa: E402

from dit_hf import DiTPipeline  # noqa: E402
from dit_hf.scheduling_dit import make_matching_scheduler  # noqa: E402


def pipeline_for(run_dir: str, call: dict) -> tuple[DiTPipeline, dict]:
    pipe = DiTPipeline.from_pretrained(run_dir)
    call = dict(call)
    family, shift = call.pop("scheduler", None), call.pop("shift", None)
    if family or shift:
        config = dict(pipe.scheduler.config)
        if shift:
            config["shift"] = shift
        pipe.scheduler = make_matching_scheduler("flow", family or "euler", config)
    if "guidance_interval" in call:
        call["guidance_interval"] = tuple(call["guidance_interval"])
    return pipe, call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="A glyphs variant folder (with train/ and test/).")
    parser.add_argument("--calls", required=True, help="JSON list of call settings.")
    parser.add_argument("--num_eval", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(RESULTS, "small-data-sampling.jsonl"))
    args = parser.parse_args(argv)
    name = os.path.basename(os.path.normpath(args.data))
    data = prepare(args.data, VARIANTS[name]["resolution"], VARIANTS[name]["channels"])
    scorer = Scorer(data, args.num_eval)
    print(f"judge {data['judge_accuracy']:.1%}, real-vs-real FID {scorer.real_fid:.1f}", flush=True)
    for settings in json.loads(args.calls):
        pipe, call = pipeline_for(args.run_dir, settings)
        row = {
            "run": os.path.basename(os.path.normpath(args.run_dir)),
            "variant": name,
            "call": settings,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **scorer(pipe, **call),
            "real_fid": scorer.real_fid,
        }
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
