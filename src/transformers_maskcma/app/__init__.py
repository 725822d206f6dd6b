"""The web demo (`maskcma app`) and the Hugging Face Space that `maskcma export --space` writes.

`ui.py` is the Gradio app itself (it needs the `[app]` extra: `pip install "transformers-maskcma[app]"`); `examples.py`
makes its offline example inputs, `space.py` writes the Space folder, `commands.py` registers `maskcma app`. Nothing
here imports gradio until the app is started.
"""
