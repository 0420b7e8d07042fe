// Standard nuclei instance segmentation metrics, matching the evaluation code of HoVer-Net
// (Graham et al. 2019, vqdang/hover_net `metrics/stats_utils.py`, `compute_stats.py`) and PanNuke
// (Gamper et al. 2020, TissueImageAnalytics/PanNuke-metrics `run.py`). Each module documents its
// definitions and where it departs from the reference code.
export * from './labels';
export * from './assignment';
export * from './pq';
export * from './aji';
export * from './dice';
export * from './detection';
export * from './scoring';
export * from './dataset';
export * from './report';
