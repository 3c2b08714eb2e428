"""Which globals named by a pickle count as dangerous callables.

ckptkit never calls anything a pickle names, so this list does not protect ckptkit itself; it
decides what ``inspect`` and ``scan`` report as *unsafe*: names that would run code, touch the
file system or network, or reach other callables if the file were loaded with ``pickle`` or
``torch.load(weights_only=False)``.  Everything else a file names is reported as an object.
"""

from __future__ import annotations

import _compat_pickle

#: Whole modules (and their submodules) whose every name is dangerous.
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "pty", "runpy", "importlib", "imp", "shutil", "socket",
    "socketserver", "webbrowser", "pip", "sys", "code", "codeop", "pickle", "_pickle", "marshal",
    "types", "ctypes", "_ctypes", "multiprocessing", "asyncio", "pydoc", "timeit", "signal",
    "tempfile", "http", "urllib", "urllib2", "requests", "httplib", "ftplib", "telnetlib",
    "smtplib", "poplib", "imaplib", "xmlrpc", "bdb", "pdb", "trace", "cProfile", "profile",
    "distutils", "setuptools", "pkg_resources", "ensurepip", "venv", "zipimport", "site",
    "sysconfig", "platform", "commands", "popen2", "_posixsubprocess", "_winapi", "msvcrt",
    "winreg", "_thread", "thread", "threading", "concurrent", "glob", "io", "_io", "fileinput",
    "mmap", "linecache", "aiohttp", "httpx", "paramiko", "dill", "cloudpickle", "joblib",
    "torch.hub", "torch.jit", "torch._inductor", "torch.utils.collect_env", "torch._dynamo",
    "torch.ops", "torch.distributed", "torch.serialization", "numpy.f2py", "numpy.testing",
    "numpy.distutils", "keras", "tensorflow", "jax", "_operator", "operator", "functools",
    "builtins", "__builtin__", "__builtins__", "inspect", "gc", "weakref", "copyreg", "abc",
    "logging", "uuid", "ssl", "select", "selectors", "resource", "atexit", "_io", "pathlib",
    "zipfile", "tarfile", "sqlite3", "dbm", "shelve", "mailcap", "cgi", "wsgiref",
    # Standard-library helpers that run a shell command or a source string they are given:
    # _osx_support._read_output / _aix_support._read_cmd_output (os.system, check_output),
    # doctest.debug_src (exec through pdb).
    "_osx_support", "_aix_support", "doctest",
    # Third-party gadgets: loaders that execute what they are given, template engines,
    # native-code loaders, and torch machinery that compiles or imports code.
    "yaml", "jinja2", "mako", "IPython", "numpy.ctypeslib", "torch.fx",
    "torch.utils.cpp_extension", "torch._C", "torch.package", "torch.compiler", "torch.export",
    "torch.utils.data.datapipes", "torch.multiprocessing", "torch.backends",
    # Resolvers: a string in, any module or callable out, so one of them reaches every name
    # this list refuses (pkgutil.resolve_name('os:system'), pydoc.locate('os.system')).
    "pkgutil", "_imp", "_frozen_importlib", "_frozen_importlib_external", "warnings",
    "xml.sax", "xml.dom", "modulefinder", "pyclbr",
    # Runners that compile, eval or exec a string they are given, or start an interpreter:
    # dataclasses._create_fn, idlelib.calltip.get_entity, test.support.script_helper,
    # rlcompleter's attr_matches, gettext's plural-form compiler, subinterpreters.
    "dataclasses", "idlelib", "test", "lib2to3", "rlcompleter", "gettext", "_pyrepl",
    "tkinter", "_tkinter", "turtle", "turtledemo", "_lsprof", "unittest", "compileall",
    "py_compile", "zipapp", "cgitb", "_interpreters", "_xxsubinterpreters", "interpreters",
    "_interpchannels", "_interpqueues", "_xxinterpchannels",
    # Network clients and servers.
    "nntplib", "smtpd", "asynchat", "asyncore", "_socket", "_ssl", "urllib3", "fsspec",
    "huggingface_hub", "boto3", "botocore", "pexpect", "sh", "plumbum",
    # Files created or overwritten by a constructor call (gzip.open(path, "wb") ...), and
    # process state.
    "gzip", "bz2", "lzma", "codecs", "mailbox", "wave", "aifc", "sunau", "h5py", "fcntl",
    "termios", "faulthandler", "readline", "_signal", "_multiprocessing", "_posixshmem",
    # torch machinery that runs code, profiles a string, writes files or downloads.
    "torch.utils.bottleneck", "torch.utils._config_module", "torch.utils.benchmark",
    "torch.utils.tensorboard", "torch.utils.model_zoo", "torch.utils.hipify", "torch.profiler",
    "torch.autograd.profiler", "torch.onnx", "torch.library", "torch._functorch",
    "torch._export", "torch.testing", "torch._lazy", "torch._higher_order_ops", "pandas.io",
})

#: Modules whose private helpers evaluate strings (typing._eval_type on a ForwardRef) while
#: their public type names are ordinary pickle content (typing.Any in OmegaConf configs).
PRIVATE_NAMES_DANGEROUS = frozenset({"typing", "typing_extensions", "annotationlib"})

#: Harmless names inside otherwise dangerous modules: not reported as unsafe, but listed as
#: objects (what only builds data is in data/pickle_allowlist.toml, checked first).
SAFE_NAMES = frozenset({
    ("functools", "total_ordering"),
    # joblib's record of an array's shape and dtype; the bytes follow it in the stream.
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
})

#: Single dangerous names in modules that are otherwise fine.
DANGEROUS_NAMES = frozenset({
    ("numpy", "load"), ("numpy", "loadtxt"), ("numpy", "fromfile"), ("numpy", "save"),
    ("numpy", "savez"), ("numpy.lib.npyio", "load"), ("numpy.core.multiarray", "fromfile"),
    ("torch", "load"), ("torch", "save"), ("torch", "compile"), ("torch", "from_file"),
    ("torch._utils", "_load_from_bytes"),
    ("pandas", "read_csv"), ("pandas", "read_pickle"), ("pandas.io.pickle", "read_pickle"),
    ("collections", "namedtuple"),
    # numpy names that create or overwrite files when called.
    ("numpy", "memmap"), ("numpy.core.memmap", "memmap"), ("numpy._core.memmap", "memmap"),
    ("numpy", "savez_compressed"), ("numpy", "savetxt"), ("numpy", "DataSource"),
    ("numpy.lib.format", "open_memmap"), ("numpy.lib._format_impl", "open_memmap"),
    ("numpy.lib.npyio", "save"), ("numpy.lib.npyio", "savez"), ("numpy.lib.npyio", "savetxt"),
    ("numpy", "fromregex"), ("numpy", "genfromtxt"), ("numpy.lib.npyio", "genfromtxt"),
    ("numpy.lib.npyio", "loadtxt"), ("numpy.lib.npyio", "fromregex"),
    # Strings evaluated as type expressions (typing's private helpers are covered as a group).
    ("typing", "get_type_hints"), ("typing", "ForwardRef"), ("typing", "evaluate_forward_ref"),
    ("typing_extensions", "get_type_hints"), ("typing_extensions", "ForwardRef"),
    ("typing_extensions", "evaluate_forward_ref"),
})


def is_dangerous(module: str, name: str) -> bool:
    """True when ``module.name`` is a callable that could run code or cause side effects."""
    if "." in name:
        # From protocol 4 on, pickle resolves a dotted name attribute by attribute, so it can
        # reach any module the named module imports ('argparse' '_os.system' is os.system).
        return True
    if (module, name) != py2_alias(module, name) and is_dangerous(*py2_alias(module, name)):
        return True  # 'cPickle' 'loads' is pickle.loads
    if (module, name) in SAFE_NAMES:
        return False
    if (module, name) in DANGEROUS_NAMES or name.startswith("__") and name.endswith("__"):
        return True
    if name.startswith("_") and module in PRIVATE_NAMES_DANGEROUS:
        return True
    if module == "pandas" and name.startswith("read_"):
        return True  # pandas.read_pickle, read_csv, read_sql ...
    root = module
    while root:
        if root in DANGEROUS_MODULES:
            return True
        root = root.rpartition(".")[0]
    return False


def py2_alias(module: str, name: str) -> tuple[str, str]:
    """What pickle actually imports for ``module.name`` in a protocol 0-2 pickle.

    Python 2 names are renamed (``fix_imports``, on by default in pickle and torch.load):
    ``cPickle`` -> ``pickle``, ``SimpleHTTPServer`` -> ``http.server``, ``__builtin__`` ->
    ``builtins`` ...; a check on the written name alone misses them.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name
