"""Declaring a listener: what a wrong declaration says, what the defaults are, notify()'s
input checks (all before any connection), and finding listeners in modules."""

import pickle
import sys
import textwrap
import uuid

import pytest
from pydantic import BaseModel

import listener
from listener import InvalidMessage, Listener, ListenerDefinitionError, registry
from listener.errors import ConfigurationError
from listener.settings import get_settings

SECRET = "s3cr3t-value"


class CopyRequest(BaseModel):
    case_id: int
    src: str
    dst: str


def _handle(self, message: CopyRequest) -> None:
    return None


_MISSING = object()


def define(name: str = "Sample", **attributes):
    """Create a Listener subclass as a class statement would (runs `__init_subclass__`)."""
    namespace = {"subscribes_to": "orders.created", "handle": _handle}
    namespace.update(attributes)
    namespace = {k: v for k, v in namespace.items() if v is not _MISSING}
    return type(name, (Listener,), namespace)


def assert_names(error: pytest.ExceptionInfo, class_name: str, attribute: str) -> None:
    text = str(error.value)
    assert f"{class_name}.{attribute}" in text, text


@pytest.fixture(autouse=True)
def no_queue_prefix(monkeypatch):
    """Default queue names here are unprefixed, whatever the surrounding environment says."""
    monkeypatch.delenv("AMQP_LISTENER_QUEUE_PREFIX", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# -- wrong declarations --------------------------------------------------------------------


def test_a_listener_without_subscribes_to_is_refused():
    with pytest.raises(ListenerDefinitionError) as caught:

        class NoSubscription(Listener):
            def handle(self, message: CopyRequest) -> None: ...

    assert_names(caught, "NoSubscription", "subscribes_to")
    assert "missing" in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        "nodot",
        "orders.",
        ".created",
        "orders.a..b",
        "orders.a*",
        "orders.#x",
        "orders.#.#",
        "bad exchange.key",
        "amq.topic.key",
        42,
    ],
)
def test_a_listener_with_a_bad_subscription_is_refused(value):
    with pytest.raises(ListenerDefinitionError) as caught:
        define("BadSubscription", subscribes_to=value)
    assert_names(caught, "BadSubscription", "subscribes_to")


def test_a_listener_without_handle_is_refused():
    with pytest.raises(ListenerDefinitionError) as caught:

        class NoHandle(Listener):
            subscribes_to = "orders.created"

    assert_names(caught, "NoHandle", "handle")
    assert "missing" in str(caught.value)


def test_a_handle_without_a_message_parameter_is_refused():
    with pytest.raises(ListenerDefinitionError) as caught:

        class NoParameter(Listener):
            subscribes_to = "orders.created"

            def handle(self) -> None: ...

    assert_names(caught, "NoParameter", "handle")


def test_a_handle_with_two_required_parameters_is_refused():
    with pytest.raises(ListenerDefinitionError) as caught:

        class TwoParameters(Listener):
            subscribes_to = "orders.created"

            def handle(self, message: CopyRequest, extra: int) -> None: ...

    assert_names(caught, "TwoParameters", "handle")
    assert "exactly one argument" in str(caught.value)


def test_a_handle_taking_the_message_only_by_keyword_is_refused():
    with pytest.raises(ListenerDefinitionError) as caught:

        class KeywordOnly(Listener):
            subscribes_to = "orders.created"

            def handle(self, *, message: CopyRequest) -> None: ...

    assert_names(caught, "KeywordOnly", "handle")


def test_a_handle_that_is_not_a_function_is_refused():
    with pytest.raises(ListenerDefinitionError) as caught:
        define("NotAFunction", handle=5)
    assert_names(caught, "NotAFunction", "handle")


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", -1),
        ("max_attempts", True),
        ("max_attempts", "3"),
        ("max_attempts", 2.0),
        ("max_attempts", None),
        ("concurrency", 0),
        ("concurrency", 70000),
        ("concurrency", 65536),
        ("concurrency", False),
        ("timeout", 0),
        ("timeout", -1),
        ("timeout", "x"),
        ("timeout", True),
        ("timeout", None),
        ("retry_delays", "abc"),
        ("retry_delays", (-1,)),
        ("retry_delays", (1, "x")),
        ("retry_delays", (1, True)),
        ("retry_delays", True),
        ("retry_delays", -2),
        ("retry_delays", {"a": 1}.keys()),
        ("queue", ""),
        ("queue", "amq.x"),
        ("queue", 5),
        ("max_deliveries", 0),
        ("max_deliveries", 21),  # past the queue's own delivery limit: never reached
        ("max_deliveries", True),
        ("max_deliveries", "5"),
    ],
    ids=repr,
)
def test_a_listener_with_a_bad_policy_value_is_refused(attribute, value):
    with pytest.raises(ListenerDefinitionError) as caught:
        define("BadPolicy", **{attribute: value})
    assert_names(caught, "BadPolicy", attribute)


def test_a_handle_annotation_that_cannot_be_resolved_is_refused():
    with pytest.raises(ListenerDefinitionError) as caught:

        class ForwardReference(Listener):
            subscribes_to = "orders.created"

            def handle(self, message: "UndefinedModel") -> None: ...  # noqa: F821

    assert_names(caught, "ForwardReference", "handle")
    assert "UndefinedModel" in str(caught.value)


def test_a_handle_annotation_pydantic_cannot_validate_is_refused():
    class NotAModel:
        pass

    with pytest.raises(ListenerDefinitionError) as caught:

        class UnvalidatableType(Listener):
            subscribes_to = "orders.created"

            def handle(self, message: NotAModel) -> None: ...

    assert_names(caught, "UnvalidatableType", "handle")


def test_a_definition_error_is_a_listener_error_and_a_type_error():
    with pytest.raises(ListenerDefinitionError) as caught:
        define("Wrong", max_attempts=0)
    assert isinstance(caught.value, listener.ListenerError)
    assert isinstance(caught.value, TypeError)


def test_a_refused_listener_is_not_registered():
    with pytest.raises(ListenerDefinitionError):
        define("Refused", subscribes_to="nodot")
    assert registry.all_listeners() == []


# -- defaults and derived attributes -------------------------------------------------------


def test_only_subscribes_to_and_handle_are_required():
    sample = define("Sample")
    assert (sample.exchange, sample.routing_key) == ("orders", "created")
    assert sample.max_attempts == 5
    assert sample.retry_delays == (1.0, 5.0, 30.0)
    assert sample.timeout == 60
    assert sample.concurrency == 8
    assert sample.queue == "sample"


def test_the_delivery_limit_is_three_times_max_attempts_at_most_the_queues_or_as_set():
    assert define("Sample").delivery_limit() == 15
    assert define("Sample", max_attempts=1).delivery_limit() == 3
    assert define("Sample", max_attempts=10).delivery_limit() == 20  # the queue's own limit
    assert define("Sample", max_attempts=10, max_deliveries=4).delivery_limit() == 4


def test_the_subscription_splits_at_the_first_dot():
    sample = define("Sample", subscribes_to="case_files.copy.requested.#")
    assert (sample.exchange, sample.routing_key) == ("case_files", "copy.requested.#")


@pytest.mark.parametrize(
    ("class_name", "queue"),
    [("FileCopier", "file_copier"), ("HTTPCallback", "http_callback"), ("Mailer", "mailer")],
)
def test_the_default_queue_is_the_class_name_in_snake_case(class_name, queue):
    assert define(class_name).queue == queue


def test_an_explicit_queue_overrides_the_default():
    assert define("FileCopier", queue="x").queue == "x"


def test_the_queue_prefix_setting_goes_before_the_default_queue(monkeypatch):
    monkeypatch.setenv("AMQP_LISTENER_QUEUE_PREFIX", "billing")
    get_settings.cache_clear()
    assert define("FileCopier").queue == "billing.file_copier"
    assert define("Explicit", queue="own.name").queue == "own.name"


def test_a_queue_prefix_that_makes_a_reserved_name_is_refused_before_the_broker_sees_it(
    monkeypatch,
):
    # RabbitMQ refuses queue names starting with 'amq.'; `queue = "amq.x"` is refused at
    # import, and a prefix producing the same name must not slip through to deploy time.
    monkeypatch.setenv("AMQP_LISTENER_QUEUE_PREFIX", "amq")
    get_settings.cache_clear()
    with pytest.raises(listener.ListenerError) as caught:
        define("FileCopier")
    assert "amq" in str(caught.value)


def test_a_subclass_of_a_concrete_listener_owns_its_own_queue():
    parent = define("FileCopier")

    class FastCopier(parent):
        pass

    assert FastCopier.queue == "fast_copier"
    assert FastCopier.subscribes_to == parent.subscribes_to
    assert registry.all_listeners() == [parent, FastCopier]


def test_an_abstract_base_shares_settings_and_is_never_registered():
    class Base(Listener, abstract=True):
        max_attempts = 3
        retry_delays = [0.1, 0.2]
        timeout = 2

    class Concrete(Base):
        subscribes_to = "orders.created"

        def handle(self, message: CopyRequest) -> None: ...

    assert (Concrete.max_attempts, Concrete.retry_delays, Concrete.timeout) == (3, (0.1, 0.2), 2)
    assert Base.__abstract__ is True
    assert Concrete.__abstract__ is False
    assert registry.all_listeners() == [Concrete]


def test_an_abstract_base_may_hold_handle_for_its_subclasses():
    class Base(Listener, abstract=True):
        def handle(self, message: CopyRequest) -> None: ...

    class Orders(Base):
        subscribes_to = "orders.created"

    assert Orders.message_type is CopyRequest
    assert registry.all_listeners() == [Orders]


def test_an_abstract_base_with_a_bad_policy_is_refused_at_once():
    with pytest.raises(ListenerDefinitionError) as caught:

        class BadBase(Listener, abstract=True):
            max_attempts = 0

    assert_names(caught, "BadBase", "max_attempts")


def test_retry_delays_given_as_a_list_become_a_tuple_of_floats():
    sample = define("Sample", retry_delays=[1, 2.5, 0])
    assert sample.retry_delays == (1.0, 2.5, 0.0)
    assert isinstance(sample.retry_delays, tuple)
    assert all(type(d) is float for d in sample.retry_delays)


@pytest.mark.parametrize("value", [3, 0.5, 0])
def test_a_single_retry_delay_is_accepted(value):
    assert define("Sample", retry_delays=value).retry_delays == (float(value),)


def test_empty_retry_delays_are_accepted():
    assert define("Sample", retry_delays=()).retry_delays == ()


def test_the_message_type_comes_from_the_handle_annotation():
    assert define("Sample").message_type is CopyRequest


def test_a_generic_annotation_is_the_message_type():
    def handle(self, message: dict[str, int]) -> None: ...

    assert define("Sample", handle=handle).message_type == dict[str, int]


def test_without_an_annotation_the_message_type_is_none():
    def handle(self, message): ...

    sample = define("Sample", handle=handle)
    assert sample.message_type is None
    assert sample.codec.decode(b'{"any": ["json"]}', None, None) == {"any": ["json"]}


def test_extra_optional_handle_parameters_are_allowed():
    def handle(self, message: CopyRequest, context: object = None) -> None: ...

    assert define("Sample", handle=handle).message_type is CopyRequest


def test_an_async_handle_is_recognised():
    async def handle(self, message: CopyRequest) -> None: ...

    assert define("Sample", handle=handle).is_async is True
    assert define("Other").is_async is False


def test_a_listener_names_itself_module_and_class():
    sample = define("Sample")
    assert sample.name() == f"{__name__}:Sample"


def test_a_listener_describes_its_topology():
    sample = define("FileCopier", retry_delays=(1, 1, 5))
    described = sample.topology()
    assert described.exchange == "orders"
    assert described.binding_key == "created"
    assert [q.name for q in described.queues] == [
        "file_copier.dead",
        "file_copier.retry.1s",
        "file_copier.retry.5s",
        "file_copier",
    ]
    # Its ways into and out of the delay levels every listener shares.
    assert {(b.source, b.destination, b.key) for b in described.delay_bindings} == {
        ("amqp-listener.delay", "amqp-listener.delay.25", "amqp-listener.to.file_copier"),
        ("amqp-listener.delay", "amqp-listener.delay.25", "x.orders.created"),
        ("amqp-listener.delay.out", "file_copier", "amqp-listener.to.file_copier"),
        ("amqp-listener.delay.out", "file_copier", "x.orders.created"),
    }


# -- notify() input checks (nothing reaches the broker) -----------------------------------


@pytest.fixture
def orders(unique):
    return define("Orders", subscribes_to=f"{unique}.orders.created")


@pytest.fixture
def wildcard(unique):
    return define("AnyOrder", subscribes_to=f"{unique}.orders.*")


def test_notify_with_a_field_of_the_wrong_type_names_the_field_not_the_value(orders):
    bad_value = SECRET
    with pytest.raises(InvalidMessage) as caught:
        orders.notify(case_id=bad_value, src="a", dst="b")
    assert "case_id" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


def test_invalid_message_lists_each_field_error_for_a_422_without_the_values(orders):
    with pytest.raises(InvalidMessage) as caught:
        orders.notify(case_id=SECRET, src=["not", "a", "string"])

    errors = caught.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [
        (("case_id",), "int_parsing"),
        (("src",), "string_type"),
        (("dst",), "missing"),
    ]
    assert all(set(e) == {"loc", "type", "msg"} and e["msg"] for e in errors)
    assert SECRET not in repr(errors)
    errors[0]["loc"] = ("changed",)  # a copy: the exception keeps its own
    assert caught.value.errors()[0]["loc"] == ("case_id",)
    copy = pickle.loads(pickle.dumps(caught.value))  # crosses a process boundary whole
    assert copy.errors() == caught.value.errors()
    assert str(copy) == str(caught.value)


def test_notify_with_missing_fields_names_them(orders):
    with pytest.raises(InvalidMessage) as caught:
        orders.notify(case_id=1)
    assert "src" in str(caught.value)
    assert "dst" in str(caught.value)


def test_notify_with_an_unknown_model_instance_is_invalid(orders):
    class Other(BaseModel):
        token: str

    with pytest.raises(InvalidMessage) as caught:
        orders.notify(Other(token=SECRET))
    assert SECRET not in str(caught.value)


async def test_anotify_checks_its_input_the_same_way(orders):
    bad_value = SECRET
    with pytest.raises(InvalidMessage) as caught:
        await orders.anotify(case_id=bad_value, src="a", dst="b")
    assert "case_id" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_notify_many_checks_every_message_before_sending_any(orders):
    good = CopyRequest(case_id=1, src="a", dst="b")
    with pytest.raises(InvalidMessage) as caught:
        orders.notify_many([good, {"case_id": SECRET, "src": "a", "dst": "b"}])
    assert "case_id" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_notify_takes_a_message_or_fields_but_not_both(orders):
    with pytest.raises(TypeError, match="not both"):
        orders.notify(CopyRequest(case_id=1, src="a", dst="b"), case_id=2)


def test_notify_on_a_wildcard_subscription_needs_a_routing_key(wildcard):
    with pytest.raises(ValueError, match="routing_key") as caught:
        wildcard.notify(case_id=1, src="a", dst="b")
    assert not isinstance(caught.value, InvalidMessage)


@pytest.mark.parametrize("key", ["orders", "orders.a.b", "other.created", "created"])
def test_notify_with_a_routing_key_the_binding_does_not_match_is_refused(wildcard, key):
    with pytest.raises(ValueError, match="does not match"):
        wildcard.notify(case_id=1, src="a", dst="b", routing_key=key)


@pytest.mark.parametrize("key", ["orders.*", "orders.#", "#"])
def test_notify_with_a_wildcard_routing_key_is_refused(wildcard, key):
    with pytest.raises(ValueError, match="wildcard"):
        wildcard.notify(case_id=1, src="a", dst="b", routing_key=key)


def test_notify_on_a_plain_subscription_with_another_key_is_refused(orders):
    with pytest.raises(ValueError, match="does not match"):
        orders.notify(case_id=1, src="a", dst="b", routing_key="orders.deleted")


async def test_anotify_on_a_wildcard_subscription_needs_a_routing_key(wildcard):
    with pytest.raises(ValueError, match="routing_key"):
        await wildcard.anotify(case_id=1, src="a", dst="b")


# -- registry: finding listeners in modules ------------------------------------------------


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """Write a module with a fresh name under tmp_path; forget it after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str, stem: str = "mod") -> str:
        name = f"{stem}_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def test_discovering_a_module_without_listeners_is_a_configuration_error(make_module):
    name = make_module("VALUE = 1\n")
    with pytest.raises(ConfigurationError) as caught:
        registry.discover([name])
    assert name in str(caught.value)
    assert "no Listener" in str(caught.value)


def test_discovering_a_module_with_only_an_abstract_base_finds_nothing(make_module):
    name = make_module(
        """
        from listener import Listener

        class Base(Listener, abstract=True):
            max_attempts = 2
        """
    )
    with pytest.raises(ConfigurationError, match="no Listener"):
        registry.discover([name])


def test_importing_a_missing_module_names_it():
    missing = f"no_such_module_{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigurationError) as caught:
        registry.discover([missing])
    assert repr(missing) in str(caught.value)


def test_importing_a_missing_submodule_names_it(make_module):
    package = make_module("VALUE = 1\n")
    with pytest.raises(ConfigurationError) as caught:
        registry.import_module(f"{package}.listeners")
    assert f"{package}.listeners" in str(caught.value)


def test_a_module_importing_a_missing_dependency_names_the_dependency(make_module):
    dependency = f"absent_dependency_{uuid.uuid4().hex[:8]}"
    name = make_module(f"import {dependency}\n")
    with pytest.raises(ConfigurationError) as caught:
        registry.discover([name])
    assert dependency in str(caught.value)
    assert name in str(caught.value)
    assert "not installed" in str(caught.value)


def test_a_module_that_fails_on_import_says_how(make_module):
    name = make_module("raise RuntimeError('settings file missing')\n")
    with pytest.raises(ConfigurationError) as caught:
        registry.discover([name])
    assert "RuntimeError" in str(caught.value)
    assert "settings file missing" in str(caught.value)


def test_a_file_path_instead_of_a_module_name_is_explained():
    with pytest.raises(ConfigurationError, match="file path"):
        registry.import_module("app/listeners.py")


def test_a_wrong_listener_in_a_module_raises_its_definition_error(make_module):
    name = make_module(
        """
        from listener import Listener

        class Broken(Listener):
            subscribes_to = "nodot"

            def handle(self, message): ...
        """
    )
    with pytest.raises(ListenerDefinitionError) as caught:
        registry.discover([name])
    assert_names(caught, "Broken", "subscribes_to")


def test_discover_finds_the_listeners_of_a_module_in_definition_order(make_module):
    name = make_module(
        """
        from listener import Listener

        class Second(Listener):
            subscribes_to = "orders.created"

            def handle(self, message): ...

        class First(Listener):
            subscribes_to = "orders.deleted"

            def handle(self, message): ...
        """
    )
    found = registry.discover([name])
    assert [cls.__name__ for cls in found] == ["Second", "First"]


def test_two_listeners_on_one_queue_are_a_configuration_error(make_module):
    name = make_module(
        """
        from listener import Listener

        class One(Listener):
            subscribes_to = "orders.created"
            queue = "shared"

            def handle(self, message): ...

        class Two(Listener):
            subscribes_to = "orders.deleted"
            queue = "shared"

            def handle(self, message): ...
        """
    )
    with pytest.raises(ConfigurationError) as caught:
        registry.discover([name])
    text = str(caught.value)
    assert "'shared'" in text
    assert f"{name}:One" in text
    assert f"{name}:Two" in text


def test_selecting_an_unknown_listener_lists_the_known_ones():
    one, two = define("Alpha"), define("Beta")
    with pytest.raises(ConfigurationError) as caught:
        registry.select([one, two], ["Gamma"])
    text = str(caught.value)
    assert "'Gamma'" in text
    assert "Alpha" in text
    assert "Beta" in text


def test_selecting_by_class_name_or_full_name():
    one, two = define("Alpha"), define("Beta")
    assert registry.select([one, two], ["Beta"]) == [two]
    assert registry.select([one, two], [f"{__name__}:Alpha"]) == [one]
    assert registry.select([one, two], []) == [one, two]
    assert registry.select([one, two], ["Alpha", "Alpha"]) == [one]
