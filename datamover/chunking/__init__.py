"""Content-defined chunking, BLAKE3 digests, chunk codecs and the pack format."""
