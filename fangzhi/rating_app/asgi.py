"""What `fangzhi rate` starts: the rating app (app.py) plus the route that serves its images per session.

`streamlit run` finds `app` here and serves it with the same server as a plain script, Streamlit's
own routes (websocket, /_stcore/health) included; media_access.py says who may fetch an image.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import streamlit as st
from streamlit import config

from fangzhi.rating_app import media_access


@asynccontextmanager
async def release_resources_at_shutdown(_app) -> AsyncIterator[None]:
    yield
    # After a graceful shutdown uvicorn ends the process by raising the stop signal again, so atexit
    # handlers never run: the study's connection (app.py's cached StudyServer) is closed here.
    st.cache_resource.clear()


app = st.App(
    Path(__file__).with_name("app.py"),
    routes=media_access.routes(config.get_option("server.baseUrlPath") or ""),
    lifespan=release_resources_at_shutdown,
)
