"""medgemma-demo: a Gradio app for MedGemma in JAX / Flax.

    from medgemma_demo import DemoConfig, build_app, launch_kwargs
    config = DemoConfig(checkpoint=None)          # the embedded Gemma 3 270M
    app = build_app(config)                       # model loads in a background thread
    app.launch(**launch_kwargs(config))

The command ``medgemma-demo`` does the same and prints the local URL. The app exposes a named
endpoint ``/chat`` (message, optional file, system prompt, max new tokens, temperature ->
answer; only the message is required) for scripts, e.g.
``gradio_client.Client(url).predict("Hi", api_name="/chat")``.
"""

from .app import DemoConfig, build_app, launch_kwargs
from .host import ChatModel, Loader
from .presets import PRESETS, Preset

__version__ = "0.1.0"
__all__ = ["PRESETS", "ChatModel", "DemoConfig", "Loader", "Preset", "build_app",
           "launch_kwargs"]
