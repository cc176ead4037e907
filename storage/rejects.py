"""Reject rows: what a stage set aside and why, in a form every stage shares."""

from __future__ import annotations


class RejectError(ValueError):
    """One item (file, clip, product) is unusable; `code` is stable, the message is for humans."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def reject_row(
    stage: str, item: str, code: str, reason: str, product_id: str | None = None, clip_id: str | None = None
) -> dict:
    return {
        "stage": stage,
        "product_id": product_id,
        "clip_id": clip_id,
        "item": item,
        "reason_code": code,
        "reason": reason,
    }
