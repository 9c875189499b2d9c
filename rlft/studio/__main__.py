"""`python -m rlft.studio [overrides ...] [--port 7860] [--session DIR]` (and `make studio`): the
feedback studio on http://127.0.0.1:<port>. The overrides are `python -m rlft`'s (model=..., sampler
and trainer settings; the algorithm is experiment=pxpo_feedback's PXPO); the default is the toy world,
offline on a CPU. ``--session`` reopens a saved session to paint and train on."""

from __future__ import annotations

import argparse
import sys

EXTRA = "pip install 'rlft[studio]'"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlft.studio", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as `python -m rlft` takes them")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--session", default=None, help="a saved session directory to continue")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(f"rlft: error: the studio needs Gradio, an optional extra: {EXTRA}", file=sys.stderr)
        sys.exit(2)
    from rlft.errors import RlftError
    from rlft.models import quiet_libraries
    from rlft.studio import Studio
    from rlft.studio.page import build_page

    quiet_libraries()
    studio, problem = None, None
    try:
        studio = Studio.open(args.session, args.overrides) if args.session else Studio(args.overrides)
    except RlftError as e:  # the page says it too: a browser user may not see this terminal
        problem = f"error: {e}"
        print(f"rlft: {problem}", file=sys.stderr)
    page = build_page(studio, problem)
    print(f"rlft: feedback studio on http://{args.host}:{args.port}", flush=True)
    page.queue().launch(server_name=args.host, server_port=args.port, inbrowser=False, show_error=True)


if __name__ == "__main__":
    main()
