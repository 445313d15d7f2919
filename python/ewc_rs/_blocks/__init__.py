"""Curvature block kinds behind one interface (:mod:`.base`), and their registry (:mod:`.registry`)."""
