"""Download a public file over HTTP into the store, once."""

import tempfile

import requests

from vibechat.common import VibechatError, print0
from vibechat.storage import Store


def download_to_store(url: str, store: Store, key: str, what: str, offline_hint: str) -> None:
    """Fetch url into store[key]; the key appears only after the whole file has arrived.

    `what` names the file in messages; `offline_hint` tells the user what to do without a network.
    """
    print0(f"downloading {what}: {url} -> {store.uri(key)}")
    try:
        with requests.get(url, stream=True, timeout=(10, 300)) as response:
            response.raise_for_status()
            # stream to a local temp file first: a dropped connection must not leave half a file in the store
            with tempfile.NamedTemporaryFile(suffix=".download") as tmp:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    tmp.write(chunk)
                tmp.flush()
                store.put_file(tmp.name, key)
    except requests.HTTPError as e:
        raise VibechatError(
            f"downloading {what} from {url} failed with HTTP {e.response.status_code}; {offline_hint}"
        ) from None
    except requests.RequestException as e:
        raise VibechatError(
            f"could not download {what} from {url} ({type(e).__name__}): is this machine offline? {offline_hint}"
        ) from None
