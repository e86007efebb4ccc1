"""compiler/export_worker.py: export children forked from one server, their output relayed."""

from __future__ import annotations

from trtc.compiler import export_worker as ew


def test_a_crashed_child_reports_its_status_and_output(tmp_path, capfd):
    """The child's traceback reaches this process's stderr before its exit status does; the server
    is stopped after the export unless kept."""
    req, res = tmp_path / "req.pkl", tmp_path / "res.pkl"
    req.write_bytes(b"not a pickle")
    was = ew._keep
    ew.keep_server(False)
    try:
        code = ew.run_child(req, res)
    finally:
        ew.keep_server(was)
    assert code == 1 and not res.exists()
    assert "UnpicklingError" in capfd.readouterr().err
    assert ew._server is None


def test_kept_server_serves_many_children(tmp_path, capfd):
    """A kept server answers several exports in turn (each child's failure reported on its own)."""
    was = ew._keep
    ew.keep_server(True)
    try:
        ew.start()
        server = ew._server
        assert server is not None
        for i in range(3):
            req = tmp_path / f"req{i}.pkl"
            req.write_bytes(b"\x80\x04N.")        # pickle of None: trace_request fails to unpack it
            assert ew.run_child(req, tmp_path / f"res{i}.pkl") == 1
            assert ew._server is server and server.alive()
        assert capfd.readouterr().err.count("Traceback") == 3
    finally:
        ew.keep_server(was)
        if not was:
            ew.stop()
