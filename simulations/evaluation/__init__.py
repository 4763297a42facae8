"""`storefed evaluate`: privacy-utility evaluation of StoreFed on real data, on shared splits."""
