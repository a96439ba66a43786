"""Reading results back from S3 (moto): what a store that refuses or does not answer turns into."""
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from djinn.spec import OutputSpec
from djinn_operator import results
from kmock_cluster import BUCKET


def _problem(uri: str, output: OutputSpec):
    with pytest.raises(results.STORE_ERRORS) as caught:
        results.probe(uri, output)
    return results.store_problem(caught.value)


def test_a_store_that_refuses_is_permanent_one_that_does_not_answer_is_not(aws, s3_endpoint):
    results.probe(f"s3://{BUCKET}/pre/lab/exp1", OutputSpec(uri=f"s3://{BUCKET}/pre", endpointUrl=s3_endpoint))

    refused = _problem("s3://no-such-bucket/pre/lab/exp1", OutputSpec(uri="s3://no-such-bucket/pre",
                                                                       endpointUrl=s3_endpoint))
    assert refused.permanent and refused.message == "NoSuchBucket: The specified bucket does not exist"

    # boto3 retries a closed port for ~15 s before it raises this: the error itself, without the wait
    silent = results.store_problem(EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bkt"))
    assert not silent.permanent
    assert silent.message == 'EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:9/bkt"'
    busy = results.store_problem(ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your\nrate"},
                                              "ResponseMetadata": {"HTTPStatusCode": 503}}, "ListObjectsV2"))
    assert not busy.permanent and busy.message == "SlowDown: Please reduce your rate"
