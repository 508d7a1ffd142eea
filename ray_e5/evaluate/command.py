"""`ray-e5 evaluate`: score the configured models on the configured MTEB tasks and write the report."""

from __future__ import annotations

import json


def _run(args) -> int:
    from ray_e5.cliargs import config_from_args
    from ray_e5.evaluate.run import evaluate

    config = config_from_args(args)
    result = evaluate(config)
    report = result.report
    if args.json:
        print(json.dumps({k: report[k] for k in ("scores", "average", "errors", "ran", "cached", "paths")
                          if k in report}, indent=2))
    else:
        from ray_e5.evaluate.report import markdown

        print(markdown(report))
        print(f"ran {len(report['ran'])} task(s), {len(report['cached'])} from cache; "
              f"report in {report.get('paths', {}).get('markdown', report['output'])}")
    return 1 if result.errors else 0


def register(subparsers) -> None:
    from ray_e5.cliargs import add_config_arguments

    p = subparsers.add_parser("evaluate", help="MTEB evaluation with the paper's instructions, fanned out over Ray",
                              description=__doc__)
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print scores as JSON instead of the markdown report")
    p.set_defaults(func=_run)
