"""Image classification machinery shared by the image recipes (mnist, pets, own images).

manifest: one row per image file (decode check, size, mode, content hash, PNG/JPEG bytes)
images:   bytes -> uint8 arrays in a declared mode and size; data statistics
augment:  seeded batch transforms on tensors (flip, rotate, zoom, translate, warp, lighting)
interpret: top losses and most-confused pairs for the evaluate stage
points:   BIWI calibration / pose files, point units, augmentation moving points (head_pose)
"""
