"""The playground's web page (Gradio): three tabs wired to :mod:`difflab.app.callbacks`.

Gradio is imported here only, inside :func:`build_app`, so the core package never needs it
(``pip install 'difflab[app]'``). Everything stays on the machine: no analytics, no version
check, no share link, no server-side rendering (which would start Node), fonts from the
package itself.
"""

import atexit
import os
import shutil
import tempfile
from contextlib import contextmanager

from difflab.app import callbacks as cb
from difflab.app.checkpoints import Playground
from difflab.errors import DifflabError

# Set before gradio is imported: it reads them at import time.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SSR_MODE": "False",
               "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _img(a):
    """(H, W, 1) grey pictures as (H, W): what gr.Image accepts; None stays None."""
    return a[..., 0] if a is not None and a.shape[-1] == 1 else a


def import_gradio():
    """gradio, with its network features off; a DifflabError if the [app] extra is missing."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import gradio as gr
    except ImportError:
        raise DifflabError("the web app needs gradio: pip install 'difflab[app]'") from None
    return gr


def build_app(pg: Playground):
    """The ``gr.Blocks`` app for the models of ``pg`` (queued: one request runs at a time)."""
    gr = import_gradio()

    @contextmanager
    def user_errors():
        try:
            yield
        except DifflabError as e:  # bad input: a one-line message in the page, not a traceback
            raise gr.Error(str(e)) from None

    anim_dir = tempfile.mkdtemp(prefix="difflab-app-")  # the animations the page shows
    atexit.register(shutil.rmtree, anim_dir, ignore_errors=True)
    with gr.Blocks(title="difflab playground", analytics_enabled=False) as demo:
        gr.Markdown("# difflab playground\nModels: " + (pg.describe() or "none") +
                    (f". Test images: {pg.data_name}." if pg.data_name else "."))
        with gr.Tab("VAE", id="vae"):
            _vae_tab(gr, pg, user_errors)
        with gr.Tab("Diffusion", id="diffusion"):
            _diffusion_tab(gr, pg, user_errors, anim_dir)
        with gr.Tab("Noise schedules", id="schedules"):
            _schedules_tab(gr, pg, user_errors)
    demo.queue(default_concurrency_limit=1)  # concurrent users wait their turn
    return demo


# ---------------------------------------------------------------------------------- VAE
def _vae_tab(gr, pg: Playground, user_errors) -> None:
    if not pg.autoencoders:
        gr.Markdown("No autoencoder or VAE was loaded: pass a `difflab train vae` run or the "
                    "`difflab demo` folder with `--ckpt`.")
        return
    names = list(pg.autoencoders)
    first = pg.autoencoders[names[0]]
    n_sliders = min(cb.MAX_SLIDERS, max(e.latent_dim for e in pg.autoencoders.values()))

    def slider_updates(entry):
        return [gr.Slider(minimum=-entry.span, maximum=entry.span, value=0.0,
                          visible=i < entry.latent_dim) for i in range(n_sliders)]

    choice = gr.Dropdown(names, value=names[0], label="model", elem_id="vae-model")
    gr.Markdown("Move the sliders over the first latent dimensions (the others stay at 0), or "
                "click the decoded latent plane of z₁ (→) and z₂ (↑).")
    with gr.Row():
        with gr.Column():
            sliders = [gr.Slider(-first.span, first.span, value=0.0, step=0.01,
                                 label=f"z{i + 1}", visible=i < first.latent_dim)
                       for i in range(n_sliders)]
            decoded = gr.Image(_img(cb.decode_latent(first, [0.0] * n_sliders)), label="decoded x",
                               interactive=False, elem_id="vae-decoded", format="png", height=224)
        with gr.Column():
            plane = gr.Image(_img(cb.plane_image(first, [0.0] * n_sliders))
                             if first.latent_dim >= 2 else None,
                             label="latent plane: click to decode", interactive=False,
                             elem_id="vae-plane", height=480, format="png")
    n_img = len(pg.test_images) if pg.test_images is not None else 0
    gr.Markdown("### Interpolation between two test images")
    if n_img < 1:
        gr.Markdown("No test images: start the app with `--data NAME`.")
    else:
        with gr.Row():
            ia = gr.Slider(0, n_img - 1, value=0, step=1, label="image A")
            ib = gr.Slider(0, n_img - 1, value=min(1, n_img - 1), step=1, label="image B")
            steps = gr.Slider(2, cb.MAX_INTERP_STEPS, value=10, step=1, label="steps")
        with gr.Row():
            img_a = gr.Image(_img(cb.test_image(pg.test_images, 0)), label="A", interactive=False,
                             height=140, format="png")
            img_b = gr.Image(_img(cb.test_image(pg.test_images, min(1, n_img - 1))), label="B",
                             interactive=False, height=140, format="png")
        interp_btn = gr.Button("Interpolate", elem_id="vae-interpolate")
        strip = gr.Image(label="A, decodes along the line between their codes, B",
                         interactive=False, elem_id="vae-strip", format="png")

        def show(i):
            with user_errors():
                return _img(cb.test_image(pg.test_images, i))

        def run_interp(name, i, j, k):
            with user_errors():
                return _img(cb.interpolate(pg.autoencoders[name], pg.test_images, i, j, k))

        ia.release(show, ia, img_a)
        ib.release(show, ib, img_b)
        interp_btn.click(run_interp, [choice, ia, ib, steps], strip)

    def redraw(name, *values):
        with user_errors():
            entry = pg.autoencoders[name]
            pic = _img(cb.plane_image(entry, values)) if entry.latent_dim >= 2 else None
            return _img(cb.decode_latent(entry, values)), pic

    def change_model(name):
        entry = pg.autoencoders[name]
        zeros = [0.0] * n_sliders
        pic = _img(cb.plane_image(entry, zeros)) if entry.latent_dim >= 2 else None
        return [*slider_updates(entry), _img(cb.decode_latent(entry, zeros)), pic]

    def on_click(evt: gr.SelectData, name, *values):  # gradio puts evt first
        with user_errors():
            entry = pg.autoencoders[name]
            if entry.latent_dim < 2:
                raise DifflabError("the latent plane needs at least 2 latent dimensions")
            side = cb.plane_side(entry)
            z1, z2 = cb.click_to_latent(evt.index[0], evt.index[1], side, side, entry.span)
            values = [z1, z2, *values[2:]]
            return [_img(cb.decode_latent(entry, values)), round(z1, 3), round(z2, 3)]

    choice.change(change_model, choice, [*sliders, decoded, plane])
    for s in sliders:
        s.release(redraw, [choice, *sliders], [decoded, plane])
    if n_sliders >= 2:
        plane.select(on_click, [choice, *sliders], [decoded, sliders[0], sliders[1]])


# ---------------------------------------------------------------------------- Diffusion
def _diffusion_tab(gr, pg: Playground, user_errors, anim_dir: str) -> None:
    if not pg.diffusion:
        gr.Markdown("No diffusion model was loaded: pass a `difflab train ddpm` or `difflab "
                    "train ldm` run, or the `difflab demo` folder, with `--ckpt`.")
        return
    from difflab.schedulers import SCHEDULERS

    names = list(pg.diffusion)
    first = pg.diffusion[names[0]]

    def class_choices(entry):
        return [cb.UNCONDITIONAL, *entry.class_names]

    choice = gr.Dropdown(names, value=names[0], label="model", elem_id="diff-model")
    with gr.Row():
        scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm++", label="scheduler",
                                elem_id="diff-scheduler")
        steps = gr.Slider(1, cb.MAX_STEPS, value=25, step=1, label="steps")
        n = gr.Slider(1, cb.MAX_IMAGES, value=8, step=1, label="images")
    with gr.Row():
        seed = gr.Number(0, precision=0, minimum=0, maximum=cb.MAX_SEED, label="seed")
        guidance = gr.Slider(0.0, cb.MAX_GUIDANCE, value=3.0, step=0.1,
                             label="guidance scale (1 = none)")
        cls = gr.Dropdown(class_choices(first), value=(first.class_names or
                                                       [cb.UNCONDITIONAL])[0],
                          label="class", visible=first.conditional, elem_id="diff-class")
    prompt = gr.Textbox(label="prompt", max_length=cb.MAX_PROMPT_CHARS,
                        visible=first.kind == "ldm", elem_id="diff-prompt")
    go = gr.Button("Sample", variant="primary", elem_id="sample-btn")
    grid = gr.Image(label="samples", interactive=False, elem_id="sample-grid", format="png")
    with gr.Row():
        anim = gr.Image(label="denoising: x_t (top) and the predicted x̂₀ (bottom)",
                        type="filepath", interactive=False, elem_id="sample-anim")
        traj = gr.Image(label="trajectory: x_t, the network's output (ε: the whole noise; v "
                        "or x̂₀ for such models; latent models: its first channels), x̂₀, "
                        "x_{t−1} (columns: steps)",
                        interactive=False, elem_id="sample-trajectory", format="png")

    def change_model(name):
        entry = pg.diffusion[name]
        return (gr.Dropdown(choices=class_choices(entry),
                            value=(entry.class_names or [cb.UNCONDITIONAL])[0],
                            visible=entry.conditional),
                gr.Textbox(visible=entry.kind == "ldm"))

    def run(name, sched, k, count, s, g, c, text, progress=gr.Progress(track_tqdm=True)):
        with user_errors():
            progress(0, desc="sampling")
            res = cb.sample(pg.diffusion[name], scheduler=sched, steps=k, seed=s, guidance=g,
                            n=count, class_name=c, prompt=text, progress=True)
            gif = None
            if res.frames:
                fd, path = tempfile.mkstemp(suffix=".gif", dir=anim_dir)
                os.close(fd)
                gif = str(cb.save_animation(res.frames, path))
            return _img(res.grid), gif, _img(res.trajectory)

    choice.change(change_model, choice, [cls, prompt])
    go.click(run, [choice, scheduler, steps, n, seed, guidance, cls, prompt], [grid, anim, traj])


# ---------------------------------------------------------------------------- Schedules
def _schedules_tab(gr, pg: Playground, user_errors) -> None:
    from difflab.viz.schedules import LABELS

    images = pg.test_images if pg.test_images is not None else cb.fallback_image()[None]
    all_names = cb.schedule_names()
    default = ["linear", "squaredcos_cap_v2"]
    with gr.Row():
        names = gr.CheckboxGroup([(LABELS.get(k, k), k) for k in all_names], value=default,
                                 label="schedules",
                                 elem_id="sched-names")
        t = gr.Slider(0, 999, value=300, step=1, label="t")
        index = gr.Slider(0, max(1, len(images) - 1), value=0, step=1, label="image",
                          visible=len(images) > 1)  # one image (no test set): nothing to pick
        seed = gr.Number(0, precision=0, minimum=0, maximum=cb.MAX_SEED, label="noise seed")
    plot = gr.Image(cb.schedule_plot(default), label="β_t, ᾱ_t and log-SNR",
                    interactive=False, elem_id="sched-plot", format="png")
    grid0, caption0 = cb.noised(images[0], default, 300)
    noisy = gr.Image(_img(grid0), label="x₀, then x_t for each schedule (the same ε)",
                     interactive=False, elem_id="sched-noised", format="png", height=200)
    caption = gr.Markdown(caption0)

    def redraw_plot(chosen):
        with user_errors():
            return cb.schedule_plot(chosen)

    def redraw_noised(chosen, tt, i, s):
        with user_errors():
            grid, caption = cb.noised(cb.pick(images, i), chosen, tt, s)
            return _img(grid), caption

    names.change(redraw_plot, names, plot)
    for w in (names, seed):
        w.change(redraw_noised, [names, t, index, seed], [noisy, caption])
    for w in (t, index):
        w.release(redraw_noised, [names, t, index, seed], [noisy, caption])


def serve(pg: Playground, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the web server (blocking unless ``block=False``); returns the app."""
    demo = build_app(pg)
    try:
        demo.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                    ssr_mode=False, prevent_thread_lock=not block, quiet=True)
    except OSError as e:  # port taken, address not on this machine: one line, exit 2
        raise DifflabError(f"cannot serve on {host}:{port}: {e}") from None
    return demo
