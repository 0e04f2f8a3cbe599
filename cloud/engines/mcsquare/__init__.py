"""MCsquare (proton PBS): the engine adapter, its beam data library (BDL) and the ion plan reader."""
