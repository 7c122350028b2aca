"""The site's gatekeeper around every handler (a Flower client mod): refuses requests beyond the site's policy,
sends nothing outside the declared schema, turns any failure into a short coded error with no site text, and
appends every reply to the site's audit log before it leaves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from flwr.app import Context, Error, Message

from mome.client import audit
from mome.client.policy import PolicyRefusal, SitePolicy
from mome.common.config import request_config
from mome.common.labels import label_spec_from_dataset_json
from mome.common.schema import ERROR_CODES, Sizes, expert_count, violations
from mome.common.sitedata import SiteDataError
from mome.common.wire import Key

log = logging.getLogger("mome.client")


class PayloadRefused(RuntimeError):
    """A reply the site's code produced but may not send (outside the schema)."""


def coded_error(msg: Message, code: str, reason: str) -> Message:
    """An error reply the coordinator may read: a short code and a reason without paths or data."""
    return Message(Error(code=ERROR_CODES[code], reason=f"{code}: {reason}"[:300]), reply_to=msg)


def _sizes(msg: Message, data_dir: Path) -> Sizes:
    cfg = request_config(msg.content[Key.CONFIG]) if Key.CONFIG in msg.content.config_records else None
    spec = label_spec_from_dataset_json(json.loads((data_dir / "dataset.json").read_text()))
    return Sizes(len(cfg.modality_names) if cfg else 0, len(spec.metric_names), expert_count(msg.content))


def guard(locate: Callable[[Context], tuple[Path, str, Path | None]],
          policy_of: Callable[[Context], SitePolicy]):
    """The mod: policy -> handler -> schema -> audit. Whatever happens, the reply is either allowed or coded."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        try:
            data_dir, site_id, out_dir = locate(context)
        except Exception:
            log.exception("this SuperNode's node config does not locate a site")
            return coded_error(msg, "site-data", "the SuperNode's node config does not name a usable site")
        try:
            policy_of(context).check(msg)
            reply = call_next(msg, context)
            if reply.has_error():  # an error a handler returned itself: keep only its code, never its text
                raise RuntimeError("handler returned an error")
            problems = violations(msg.metadata.message_type, reply.content, msg.content, _sizes(msg, data_dir))
            if problems:
                raise PayloadRefused("; ".join(problems))
        except PolicyRefusal as exc:
            reply = coded_error(msg, "policy", str(exc))
        except PayloadRefused as exc:
            log.error("site %s: reply to %s withheld, outside the declared schema: %s", site_id,
                      msg.metadata.message_type, exc)
            reply = coded_error(msg, "payload", "the reply was outside the declared schema and was not sent "
                                "(details in the site's log)")
        except SiteDataError as exc:
            log.error("site %s: %s", site_id, exc)
            reply = coded_error(msg, "site-data", "the site's data folder cannot be used (details in its log)")
        except Exception as exc:  # the traceback stays here; the coordinator learns the exception type only
            log.exception("site %s: %s failed", site_id, msg.metadata.message_type)
            reply = coded_error(msg, "internal", f"{type(exc).__name__} at the site (details in its log)")
        if out_dir is not None:
            audit.append(out_dir, audit.entry(msg, reply, site_id))
        return reply

    return mod
