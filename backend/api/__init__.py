"""HTTP layer: one router per resource; logic lives in `kdlab.backend.services`."""
