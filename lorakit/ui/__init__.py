"""`lorakit ui`: the whole workflow (settings, run, loss curve, chat, export) in a local web page.

`actions` holds what the buttons do as plain functions (tested without a browser); `app` lays out
the Gradio page around them and serves it on 127.0.0.1. Gradio is an optional dependency
(`pip install 'lorakit[ui]'`), imported only by `app`.
"""
