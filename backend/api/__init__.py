"""HTTP layer: one router per resource; logic lives in `backend.services`."""
