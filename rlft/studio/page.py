"""The studio's web page (Gradio): every control calls one method of :class:`rlft.studio.Studio`.

    generate -> a gallery of candidates from fixed noise; click one to paint on it
    paint    -> the like (green) and dislike (red) brushes, and the eraser, over the sample
    train    -> PXPO for N epochs on the painted map (progress from the runner's bars), then the
                image redrawn from the same noise beside the one painted on and the map, and the
                mean pixel change inside the liked and the disliked strokes
    undo / save

A mistake (no sample picked, nothing painted, a model that cannot load) is one line in the status
box; the session on disk is left as it was.

(No ``from __future__ import annotations`` here: Gradio reads ``gr.SelectData`` from the handler's
annotation, which must be a class, not a string.)
"""

import math

import numpy as np

from rlft.errors import RlftError
from rlft.studio import DISLIKE_COLOR, LIKE_COLOR, Round, Studio, strokes_to_map

STATUS_ID, CHANGE_ID = "studio-status", "studio-change"


def _change_line(result: Round) -> str:
    """The page's account of a round (the browser test reads the two numbers from it)."""

    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.2f}"

    return (
        f"round {result.round} ({result.epochs} epochs): mean pixel change (0-255) "
        f"liked {fmt(result.liked_change)} over {result.liked_pixels} px, "
        f"disliked {fmt(result.disliked_change)} over {result.disliked_pixels} px "
        f"({result.seconds:.0f} s)"
    )


def _layers(value) -> list[np.ndarray]:
    if not value:
        return []
    return [np.asarray(layer) for layer in value.get("layers") or [] if layer is not None]


def build_page(studio: Studio | None, problem: str | None = None):
    """The Blocks app on ``studio`` (None: the page only states ``problem``, e.g. a model that cannot load)."""
    import gradio as gr

    with gr.Blocks(title="rlft feedback studio") as page:
        gr.Markdown(
            "## rlft feedback studio\n1. type a prompt and generate; click the sample to work on. "
            "2. paint what you like in **green** and what you dislike in **red** (the eraser removes strokes). "
            "3. train: PXPO redraws the image from the same noise and learns from your map."
        )
        status = gr.Markdown(problem or "ready", elem_id=STATUS_ID)
        if studio is None:
            return page
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value="a red circle", elem_id="studio-prompt", scale=3)
            count = gr.Number(label="samples", value=4, precision=0, minimum=1, maximum=16, scale=1)
            first_seed = gr.Number(label="first seed", value=0, precision=0, scale=1)
            generate = gr.Button("generate", elem_id="studio-generate", scale=1)
        gallery = gr.Gallery(
            label="candidates (click one)", columns=4, height=220, allow_preview=False, elem_id="studio-gallery"
        )
        side = studio.display_size
        with gr.Row():
            editor = gr.ImageEditor(
                value=studio.enlarge(studio.current) if studio.session is not None else None,  # a reopened session
                label="paint: green = like, red = dislike",
                type="numpy",
                image_mode="RGBA",
                sources=(),
                transforms=(),
                brush=gr.Brush(colors=[LIKE_COLOR, DISLIKE_COLOR], color_mode="fixed", default_size=side[0] // 16),
                eraser=gr.Eraser(default_size=side[0] // 16),
                layers=gr.LayerOptions(allow_additional_layers=False),
                canvas_size=side,
                fixed_canvas=True,
                format="png",
                elem_id="studio-editor",
            )
            with gr.Column():
                epochs = gr.Slider(
                    1, 100, value=studio.cfg.trainer.epochs, step=1, label="epochs per round", elem_id="studio-epochs"
                )
                train = gr.Button("train", variant="primary", elem_id="studio-train")
                with gr.Row():
                    undo = gr.Button("undo last round", elem_id="studio-undo")
                    save = gr.Button("save session", elem_id="studio-save")
        with gr.Row():
            before = gr.Image(label="painted on", type="numpy", interactive=False, elem_id="studio-before")
            after = gr.Image(
                label="redrawn from the same noise", type="numpy", interactive=False, elem_id="studio-after"
            )
            painted = gr.Image(label="map", type="numpy", interactive=False, elem_id="studio-map")
        change = gr.Markdown("", elem_id=CHANGE_ID)

        def on_generate(text, n, seed):
            try:
                images = studio.generate(text, int(n or 4), int(seed or 0))
            except RlftError as e:
                return gr.update(), f"error: {e}"
            return [studio.enlarge(im) for im in images], f"{len(images)} samples of '{studio.prompt}': click one"

        def on_pick(evt: gr.SelectData):
            try:
                image = studio.pick(int(evt.index))
            except RlftError as e:
                return gr.update(), f"error: {e}"
            return studio.enlarge(image), f"session {studio.dir}: paint over the sample, then train"

        def on_train(value, n, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - Gradio's way to show progress
            try:
                shown = studio.current  # StudioError before a pick
                feedback = strokes_to_map(_layers(value), studio.display_size)
                result = studio.train(feedback, int(n))
            except Exception as e:  # noqa: BLE001 - the page stays up; the session on disk is as the last round left it
                problem = e if isinstance(e, RlftError) else f"{type(e).__name__}: {e}"
                return gr.update(), gr.update(), gr.update(), gr.update(), f"error: {problem}", gr.update()
            new = studio.current
            return (
                studio.enlarge(shown),
                studio.enlarge(new),
                feedback,
                _change_line(result),
                f"round {result.round} done: paint again on the new image, or undo",
                studio.enlarge(new),
            )

        def on_undo():
            try:
                image = studio.undo()
            except RlftError as e:
                return gr.update(), f"error: {e}", gr.update()
            return studio.enlarge(image), f"undone: back to {len(studio.session.rounds)} rounds", ""

        def on_save():
            try:
                where = studio.save()
            except RlftError as e:
                return f"error: {e}"
            cmds = studio.commands()
            return f"saved {where}  \ncontinue: `{cmds['resume']}`  \nexport: `{cmds['export']}`"

        generate.click(on_generate, [prompt, count, first_seed], [gallery, status])
        gallery.select(on_pick, None, [editor, status])
        train.click(on_train, [editor, epochs], [before, after, painted, change, status, editor])
        undo.click(on_undo, None, [editor, status, change])
        save.click(on_save, None, [status])
    return page
