"""Objects from class labels: touching nuclei split into one id each, measured, exported.

``split`` is the seamless, tile-by-tile split of a class mask; ``request`` says which classes
of a model to split, and how; ``output`` is the objects pass over a finished segmentation
output; ``measure`` and ``detections`` give per-object figures and QuPath detections.

May import: ``io`` and the top-level modules. Nothing here runs a network.
"""
