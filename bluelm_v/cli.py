"""``bluelm-v``: inspect what is installed; ``bluelm-v run`` forwards to the launcher.

    bluelm-v plugins [--json] [--family tiler] [PATTERN]   registered components and providers
                                                            (clashing names listed and marked)
    bluelm-v describe tiler relaxed                         parameters with defaults
    bluelm-v jobs                                           experiments and their purpose
    bluelm-v run +experiment=ablate_tiling [overrides]      same as python -m bluelm_v.launch
"""
from __future__ import annotations

import argparse
import json
import sys


def _plugins(args) -> int:
    """Every registration, also when two plugins register one name (both rows, marked
    ``CLASH``; a warning names the providers): the listing is how the culprit is found."""
    from . import plugin_manager as plugins

    _, registry, report = plugins.get()
    rows = [r for r in registry.rows() if (not args.family or r["family"] == args.family)]
    if args.pattern:
        import fnmatch
        rows = [r for r in rows if fnmatch.fnmatchcase(r["name"], args.pattern)]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        width = max([len(r["name"]) for r in rows] + [4])
        cur = None
        for r in rows:
            if r["family"] != cur:
                cur = r["family"]
                print(f"\n{cur}:")
            mark = "  CLASH" if r.get("clash") else ""
            print(f"  {r['name']:<{width}}  {r['provider']:<14}  {r['description']}{mark}")
        if report.blocked or report.skipped_autoload:
            print(f"\nnot loaded: blocked {report.blocked or '[]'}, autoload off {report.skipped_autoload or '[]'}")
    for line in report.clashes:
        print(f"warning: {line}: using that name fails until one is uninstalled or blocked "
              "(plugins.block=[NAME])", file=sys.stderr)
    return 0


def _describe(args) -> int:
    from . import plugin_manager as plugins

    _, registry, _ = plugins.get()
    print(json.dumps(registry[args.family].describe(args.name), indent=2, default=str))
    return 0


def _jobs(args) -> int:
    from .job import list_jobs

    rows = list_jobs()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no experiments found in bluelm_v.conf/experiment")
        return 1
    width = max(len(r["experiment"]) for r in rows)
    for r in rows:
        print(f"  +experiment={r['experiment']:<{width}}  job={r['job']:<14} {r['description']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        from . import launch
        sys.argv = ["bluelm_v.launch", *argv[1:]]
        launch.main()
        return 0
    parser = argparse.ArgumentParser(prog="bluelm-v", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plugins", help="list registered components, by family, with their provider")
    p.add_argument("pattern", nargs="?", help="fnmatch pattern on the component name, e.g. 'l*'")
    p.add_argument("--family", help="only this family (tiler, encoder, ...)")
    p.add_argument("--json", action="store_true", help="a JSON list of {family, name, provider, description, ...}")
    p.set_defaults(func=_plugins)
    p = sub.add_parser("describe", help="parameters and provenance of one component")
    p.add_argument("family")
    p.add_argument("name")
    p.set_defaults(func=_describe)
    p = sub.add_parser("jobs", help="experiments (+experiment=NAME) with their job and purpose")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_jobs)
    sub.add_parser("run", help="run an experiment: bluelm-v run +experiment=NAME [overrides]")
    args = parser.parse_args(argv)
    from .errors import BlueLMVError
    try:
        return args.func(args)
    except BlueLMVError as exc:
        print(f"bluelm-v: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
